"""A choice's tokens becoming events: text, reasoning, logprobs, tool calls, and how it ends. Engine thread
only."""

from __future__ import annotations

import time

from adapters.base import ChoiceFinished, TokenEvent, TokenLogprob, TopLogprob
from adapters.mlx_lm.models import MlxTokenizer
from adapters.mlx_lm.reasoning import reasoning_split
from adapters.mlx_lm.sampling import SampledToken
from adapters.mlx_lm.text import StopTextAssembler
from adapters.mlx_lm.tool_calls import ChoiceText
from adapters.mlx_lm.work import Choice, Request

__all__ = ["accept", "choice_text", "end_choice", "token_logprobs"]


def accept(request: Request, choice: Choice, sampled: SampledToken) -> None:
    """Take one sampled token: its event, and the choice's end when it is EOS, a stop string or the limit."""
    tokenizer = request.model.tokenizer
    params = request.plan.sampling
    if not request.first_token_at:
        request.first_token_at = time.perf_counter()
    choice.generated += 1
    request.completion_tokens += 1
    choice.last = sampled.token
    logprobs = token_logprobs(tokenizer, sampled) if params.logprobs else ()
    if sampled.token in tokenizer.eos_token_ids:
        choice.done = True
        request.emit(TokenEvent(choice.index, "", (sampled.token,), logprobs))
        end_choice(request, choice, "stop")
        return
    text = choice.text
    delta = text.add(sampled.token)
    if request.reasoning_tokens is not None and text.thinking:
        request.reasoning_tokens += 1
    request.emit(TokenEvent(choice.index, delta, (sampled.token,), logprobs, text.take_calls(), text.take_reasoning()))
    if choice.text.stopped:
        choice.done = True
        end_choice(request, choice, "stop")
    elif choice.generated >= params.max_tokens:
        choice.done = True
        end_choice(request, choice, "length")


def choice_text(request: Request) -> ChoiceText:
    """A new choice's text: detokenised, a thinking model's reasoning split off (when the plan asks),
    cut at stop strings, tool calls parsed."""
    tokenizer = request.model.tokenizer
    plan = request.plan
    split = reasoning_split(tokenizer.wrapper, plan.prompt_tokens) if plan.reasoning else None
    if split is not None and request.reasoning_tokens is None:
        request.reasoning_tokens = 0  # counted from now on, and reported in the usage
    text = StopTextAssembler(tokenizer.detokenizer(), plan.sampling.stop, split)
    return ChoiceText(text, plan.tools, tokenizer.wrapper)


def end_choice(request: Request, choice: Choice, reason: str) -> None:
    """The choice's last text and tool calls, then its finish: ``tool_calls`` when it stopped after
    calling tools (as OpenAI reports it; a call cut off by max_tokens stays ``length``)."""
    text = choice.text.finish()
    calls = choice.text.take_calls()
    thought = choice.text.take_reasoning()  # a block cut off: its held-back end
    if calls or thought:
        request.emit(TokenEvent(choice.index, text, (), (), calls, thought))
        text = ""
    if reason == "stop" and choice.text.made_calls:
        reason = "tool_calls"
    request.emit(ChoiceFinished(choice.index, reason, text))


def token_logprobs(tokenizer: MlxTokenizer, sampled: SampledToken) -> tuple[TokenLogprob, ...]:
    text, raw = tokenizer.token_text(sampled.token)
    top = []
    for token_id, lp in sampled.top:
        t_text, t_raw = tokenizer.token_text(token_id)
        top.append(TopLogprob(t_text, lp, t_raw))
    return (TokenLogprob(text, sampled.token, sampled.logprob or 0.0, raw, tuple(top)),)
