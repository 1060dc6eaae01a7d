"""Stop-string handling on the real tiny tokenizer's streaming detokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from adapters.mlx_lm.models import MlxTokenizer
from adapters.mlx_lm.presets import build_model
from adapters.mlx_lm.text import StopTextAssembler


@pytest.fixture(scope="module")
def tok(models_dir: Path) -> MlxTokenizer:
    path = build_model("tiny", models_dir=models_dir)
    return MlxTokenizer(load_tokenizer(path), 32000)


def stream(tok: MlxTokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:
    asm = StopTextAssembler(tok.detokenizer(), stop)
    out = []
    for t in tok.encode(text):
        out.append(asm.add(t))
        if asm.stopped:
            break
    else:
        out.append(asm.finish())
    return out, asm.stopped


def test_exact_text_without_stop(tok: MlxTokenizer) -> None:
    text = " leading space, unicode é→✓ and\nnewlines  "
    pieces, stopped = stream(tok, text, ())
    assert "".join(pieces) == text and not stopped


def test_stop_inside_a_token_and_across_tokens(tok: MlxTokenizer) -> None:
    text = "def function_name(argument): return value"
    for stop in ("_name(arg", "e(", "return", "ue"):
        pieces, stopped = stream(tok, text, (stop,))
        assert stopped and "".join(pieces) == text[: text.index(stop)]
        emitted = ""
        for p in pieces:
            emitted += p
            assert text[: text.index(stop)].startswith(emitted)


def test_earliest_of_several_stops_wins(tok: MlxTokenizer) -> None:
    text = "alpha beta gamma delta"
    pieces, stopped = stream(tok, text, ("delta", "beta", "gamma"))
    assert stopped and "".join(pieces) == "alpha "


def test_partial_match_is_released_at_the_end(tok: MlxTokenizer) -> None:
    pieces, stopped = stream(tok, "value = 1; val", ("valid",))
    assert not stopped and "".join(pieces) == "value = 1; val"


CONVERSATIONS = [
    [{"role": "system", "content": "You answer briefly. Tabs\tand  double spaces, ünïcödé, 数字 42."}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "ends without a newline"},
        {"role": "assistant", "content": "  leading spaces and a trailing one "},
    ],
]
FOLLOWING = [
    [{"role": "user", "content": "What next?"}],
    [{"role": "user", "content": "\n\nstarts with newlines"}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "<|im_start|> typed by the user"}],
]


@pytest.mark.parametrize("cached", CONVERSATIONS)
@pytest.mark.parametrize("following", FOLLOWING)
def test_encode_after_a_cached_conversation_equals_encode(
    tok: MlxTokenizer, cached: list[dict[str, str]], following: list[dict[str, str]]
) -> None:
    """A chat hit tokenises only what follows the cache; the result must be the whole text's tokens."""
    cache_text = tok.render_chat(cached, add_generation_prompt=False)
    text = tok.render_chat(cached + following, add_generation_prompt=True)
    assert text.startswith(cache_text)
    assert text[len(cache_text) :].startswith(tok.text.special_texts)  # the fast path is the one tested
    assert tok.encode_after(cache_text, tok.encode(cache_text), text) == tok.encode(text)


def test_encode_after_encodes_the_whole_where_a_boundary_can_merge(tok: MlxTokenizer) -> None:
    # Not at a special token: "hel" + "lo" tokenise apart differently than "hello" does.
    prefix, text = "say hel", "say hello world"
    wrong = [*tok.encode(prefix), *tok.encode(text[len(prefix) :])]
    assert wrong != tok.encode(text)  # the case the guard exists for
    assert tok.encode_after(prefix, tok.encode(prefix), text) == tok.encode(text)
    # A text that does not start with the prefix is encoded whole.
    assert tok.encode_after("other", tok.encode("other"), text) == tok.encode(text)
