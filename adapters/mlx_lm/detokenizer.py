"""Streaming detokenizers whose text is exactly the tokens' decoding.

mlx-lm's detokenizers drop the first leading space of a generation (right for a chat answer's first word,
wrong for completions: ``x =`` + `` 5`` would lose its space). Its SentencePiece one has a public switch
for that (``trim_space``); its byte-level BPE one has none, so :class:`ByteLevelDetokenizer` is ours: the
same algorithm as mlx-lm 0.32's ``BPEStreamingDetokenizer`` on the GPT-2 byte table, without the trim.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import cache

from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    StreamingDetokenizer,
    TokenizerWrapper,
)

__all__ = ["ByteLevelDetokenizer", "byte_decoder", "exact_detokenizer"]


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character to byte: how byte-level BPE vocabularies spell raw bytes.

    Printable bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the other 68 are
    spelled by ``chr(256 + n)`` in byte order (space is ``Ġ``, newline ``Ċ``). This is the table of
    openai/gpt-2's ``bytes_to_unicode``, which Hugging Face's ByteLevel decoder and mlx-lm use.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shown = set(printable)
    n = 0
    for b in range(256):
        if b not in shown:
            table[chr(256 + n)] = b
            n += 1
    return table


class ByteLevelDetokenizer(StreamingDetokenizer):
    """A byte-level BPE tokenizer's tokens to text, one token at a time.

    Pieces are mapped back to bytes; text is released once its bytes form whole UTF-8 characters, and a
    token that is a lone space waits for the next token (as in mlx-lm's, so that streamed deltas split
    where they always did). Unlike mlx-lm's, no leading space is dropped, the NUL byte decodes to NUL (its
    ``if byte:`` took byte 0 for a missing entry) and :meth:`finalize` accepts any piece.
    """

    def __init__(self, pieces: Sequence[str | None]) -> None:
        """Args:
        pieces: each token id's piece (``convert_ids_to_tokens`` of every id), shared and never written.
        """
        self.tokenmap = pieces
        self.reset()

    def reset(self) -> None:
        """Forget the tokens so far (the piece table stays)."""
        self.offset = 0
        self.text = ""
        self.tokens: list[int] = []
        self._unflushed = ""

    def add_token(self, token: int) -> None:
        """Add ``token``; :attr:`text` grows by whatever became complete."""
        self.tokens.append(token)
        # Ids past the tokenizer (a padded vocabulary's logits) decode as mlx-lm's do: "!". The engine cuts
        # the logits at the tokenizer's size, so none is sampled; this only keeps a stray one from raising.
        piece = (self.tokenmap[token] or "") if token < len(self.tokenmap) else "!"
        self._unflushed += piece
        text = _decode(self._unflushed)
        lone_space = len(piece) == 1 and byte_decoder().get(piece) == 0x20
        if not text.endswith("\ufffd") and not lone_space:
            self.text += text
            self._unflushed = ""

    def finalize(self) -> None:
        """Release what was held back (a lone space, or bytes of an unfinished character, replaced)."""
        self.text += _decode(self._unflushed)
        self._unflushed = ""


def _decode(pieces: str) -> str:
    """Byte-level characters to text; a character outside the byte table (an added token's text) is itself."""
    table = byte_decoder()
    raw = bytearray()
    for ch in pieces:
        b = table.get(ch)
        if b is None:
            raw.extend(ch.encode())
        else:
            raw.append(b)
    return raw.decode("utf-8", "replace")


def exact_detokenizer(wrapper: TokenizerWrapper, pieces: Sequence[str | None]) -> StreamingDetokenizer:
    """A detokenizer for ``wrapper``'s tokenizer, of the kind mlx-lm chose for it, that drops no space.

    Args:
        wrapper: mlx-lm's tokenizer; its detokenizer's class says how the vocabulary spells text.
        pieces: every id's piece (``convert_ids_to_tokens``), for a byte-level vocabulary.

    Returns:
        A fresh detokenizer; copy it per sequence (``copy.copy`` then ``reset()``: the piece table is shared).
    """
    chosen = wrapper.detokenizer  # a reset copy of the one mlx-lm built for this tokenizer
    if isinstance(chosen, BPEStreamingDetokenizer):
        return ByteLevelDetokenizer(pieces)
    detok = copy.copy(chosen)
    if isinstance(detok, SPMStreamingDetokenizer):  # SentencePiece's has a public switch for the same trim
        detok.trim_space = False
    return detok
