"""ByteLevelDetokenizer: the tiny model's byte-level BPE tokenizer, streamed token by token, gives exactly
the tokenizer's decoding, and the same deltas as mlx-lm's own detokenizer wherever that one drops nothing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, StreamingDetokenizer
from mlx_lm.tokenizer_utils import load as load_tokenizer

from adapters.mlx_lm.detokenizer import ByteLevelDetokenizer, byte_decoder
from adapters.mlx_lm.models import MlxTokenizer
from adapters.mlx_lm.presets import build_model

TEXTS = [
    " leading space, then two:  and a tab\tend",
    "  two leading spaces",
    "emoji 🚀🧑‍🚀 (a ZWJ sequence), flags 🇫🇷, CJK 東京 数字, accents naïve café é→✓",
    "\n\nnewlines first\r\n",
    "trailing space ",
    "single ",
    " ",
    "nul \x00 byte and \x7f",
    "<tool_call>\n{}\n</tool_call>",
]


@pytest.fixture(scope="module")
def tok(models_dir: Path) -> MlxTokenizer:
    wrapper = load_tokenizer(build_model("tiny", models_dir=models_dir))
    return MlxTokenizer(wrapper, len(wrapper))


def deltas(detok: StreamingDetokenizer, tokens: list[int]) -> list[str]:
    detok.reset()
    out = []
    for t in tokens:
        detok.add_token(t)
        out.append(detok.last_segment)
    detok.finalize()
    out.append(detok.last_segment)
    return out


def test_the_tiny_tokenizer_is_byte_level(tok: MlxTokenizer) -> None:
    assert isinstance(tok.detokenizer(), ByteLevelDetokenizer)
    assert isinstance(tok.wrapper.detokenizer, BPEStreamingDetokenizer)  # what mlx-lm chose, seen publicly


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_is_the_tokenizers_decoding(tok: MlxTokenizer, text: str) -> None:
    tokens = tok.encode(text)
    pieces = deltas(tok.detokenizer(), tokens)
    assert "".join(pieces) == tok.decode(tokens) == text


@pytest.mark.parametrize("text", [t for t in TEXTS if not t.startswith(" ") and "\x00" not in t])
def test_deltas_are_mlx_lms_where_it_drops_nothing(tok: MlxTokenizer, text: str) -> None:
    # mlx-lm's drops a first leading space and misreads byte 0; elsewhere it splits the text as ours does.
    tokens = tok.encode(text)
    assert deltas(tok.detokenizer(), tokens) == deltas(tok.wrapper.detokenizer, tokens)


def test_each_copy_streams_on_its_own(tok: MlxTokenizer) -> None:
    a, b = tok.detokenizer(), tok.detokenizer()
    a.add_token(tok.encode("hello")[0])
    assert b.text == "" and b.tokens == [] and a.tokens != []
    c = copy.copy(a)
    c.reset()
    assert a.tokens and not c.tokens


def test_an_unfinished_character_is_held_then_replaced(tok: MlxTokenizer) -> None:
    table = {b: ch for ch, b in byte_decoder().items()}
    first_byte_of_rocket = table["🚀".encode()[0]]
    ids = [i for i, piece in enumerate(tok._id_to_piece) if piece == first_byte_of_rocket]
    detok = tok.detokenizer()
    detok.add_token(ids[0])
    assert detok.text == ""  # waits for the rest of the character
    detok.finalize()
    assert detok.text == "\ufffd"


def test_the_byte_table_is_gpt2s() -> None:
    table = byte_decoder()
    assert sorted(table.values()) == list(range(256)) and len(table) == 256
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["Ā"] == 0x00 and table["!"] == ord("!")
    assert table["ÿ"] == 0xFF and table["Ń"] == 0xAD  # the one unprintable byte between ¬ and ®
