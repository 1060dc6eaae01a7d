"""LangChain's ChatOpenAI and LlamaIndex's OpenAILike against the real server."""

from __future__ import annotations

from langchain_openai import ChatOpenAI
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike

from tests.servers import Server


def test_langchain_invoke_and_stream(server: Server) -> None:
    llm = ChatOpenAI(
        base_url=server.v1,
        api_key="unused",
        model="tiny",
        max_tokens=8,
        temperature=0,
        max_retries=0,
        extra_body={"some_extra": True},
    )
    reply = llm.invoke("Write hello world in Python")
    assert isinstance(reply.content, str)
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] <= 8
    chunks = list(llm.stream("Write hello world in Python"))
    assert "".join(str(c.content) for c in chunks) == reply.content


def test_llamaindex_chat_and_complete(server: Server) -> None:
    chat_llm = OpenAILike(
        api_base=server.v1,
        api_key="unused",
        model="tiny",
        is_chat_model=True,
        max_tokens=8,
        temperature=0,
        context_window=8192,
        max_retries=0,
    )
    reply = chat_llm.chat([ChatMessage(role="user", content="hello")])
    assert isinstance(reply.message.content, str)
    streamed = "".join(r.delta or "" for r in chat_llm.stream_chat([ChatMessage(role="user", content="hello")]))
    assert streamed == reply.message.content
    complete_llm = OpenAILike(
        api_base=server.v1,
        api_key="unused",
        model="tiny",
        is_chat_model=False,
        max_tokens=8,
        temperature=0,
        context_window=8192,
        max_retries=0,
    )
    done = complete_llm.complete("def fib(n):")
    assert isinstance(done.text, str) and done.text
    streamed_c = "".join(r.delta or "" for r in complete_llm.stream_complete("def fib(n):"))
    assert streamed_c == done.text
