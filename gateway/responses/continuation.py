"""The prompt of a response that continues a stored one (``previous_response_id``), and how much of the stored
response's KV it reuses.

The continued prompt is the stored response's token ids (its prompt, its output as the model wrote it, and the
end-of-turn token it wrote) followed by the tokens of what the newly rendered conversation adds. Re-encoding the
whole conversation from text instead would tokenise the model's output anew, which need not give the ids the
model wrote, and the stored KV would then not be a prefix of the prompt. The ids stand for the conversation
only where its rendering starts with exactly the text they decode to (the stored prompt's rendering, then the
output as written): a change of ``instructions`` or ``tools`` (OpenAI does not carry ``instructions`` over; the
Agents SDK resends them each turn), a template that renders the earlier turn otherwise (a tool call in its own
format, thinking dropped from history) or a stop string cut from the text all fail that test, and the
conversation is then encoded from its text, reusing whatever leading tokens it shares with the stored ids.

Either way the prompt's tokens are decided here, before the engine sees them: whether the KV is still in memory
changes only how much is prefilled, never the tokens, so the greedy answer is the same with or without it.

Pure functions: any thread may call them (planning runs in a worker thread).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from adapters.base import PromptTokenizer

__all__ = ["continued_tokens", "sequence_text"]


def sequence_text(prompt_text: str, output_ids: Sequence[int], tokenizer: PromptTokenizer) -> tuple[int, str]:
    """What a stored response's ids stand for: the length and sha256 of its rendered prompt followed by its
    output as written (without the end-of-turn token, which the next rendering writes in its own place)."""
    ids = list(output_ids)
    if ids and ids[-1] in tokenizer.eos_token_ids:
        ids.pop()
    text = prompt_text + tokenizer.decode(ids)
    return len(text), hashlib.sha256(text.encode()).hexdigest()


def continued_tokens(
    text: str,
    token_ids: Sequence[int],
    text_chars: int,
    text_sha256: str,
    tokenizer: PromptTokenizer,
) -> list[int] | None:
    """The tokens of ``text`` (a rendered conversation) as the stored ids followed by what ``text`` adds; None
    when ``text`` does not start with what the ids stand for."""
    if not token_ids or not text_sha256 or len(text) <= text_chars:
        return None
    if hashlib.sha256(text[:text_chars].encode()).hexdigest() != text_sha256:
        return None
    tail = text[text_chars:]
    ids = list(token_ids)
    if ids[-1] in tokenizer.eos_token_ids:
        # The model ended its turn with this token; the template ends the rendered turn with its text.
        end = tokenizer.decode([ids[-1]])
        if not end or not tail.startswith(end):
            return None
        tail = tail[len(end) :]
    return ids + tokenizer.encode(tail)
