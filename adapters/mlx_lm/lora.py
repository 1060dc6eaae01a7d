"""LoRA and DoRA adapters made by ``mlx_lm.lora``, served on one copy of their base model's weights, each row
of a batch with its own adapter.

Loading an adapter does not copy the base model: each linear layer an adapter touches is wrapped once in an
:class:`AdaptedLinear`, which keeps the base layer and, stacked by adapter index, every adapter's low-rank
factors (``A``: in x rank, ``B``: rank x out, the adapter's scale folded into ``B``) and, for DoRA, the
per-output factor ``m / ||W + scale * (A B)^T||`` (fixed once the adapter is: computed at load). Index 0 is
the base model, which has no factors. A forward pass reads which index each of its rows uses from the
model's :class:`AdapterBank` (:meth:`AdapterBank.selected`): per wrapped layer, one matrix product projects
every row onto every adapter's ``A`` (all adapters' blocks side by side), a mask keeps each row's own block
(none for a base-model row), and one product with the stacked ``B`` maps it back: two dense products whose
inner size is the adapters' ranks added up, whatever the mix of rows. A pass with no adapter row runs the base
layers alone.

Why per row rather than one step per adapter: a batch of four adapters and the base model would take five
decode steps' weight reads for one step's tokens; per row, the extra reads are the adapters' factors. Why dense
blocks rather than ``gather_mm`` over the stacked factors (the first version): on an H100 (8B shape, 32 rows)
gather_mm made a decode step 2.1x the base model's (``bench/adapters.py`` measures the variants).

Ownership: the engine thread owns every bank, its layers and their arrays (it alone builds forward passes);
nothing else touches them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

__all__ = ["AdaptedLinear", "AdapterBank", "AdapterError", "AdapterFiles", "read_adapter"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
_LEAVES = ("lora_a", "lora_b", "m")


class AdapterError(ValueError):
    """Files that are not an adapter this server can serve on its base model (the client's to fix: a 400)."""


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter directory as read from disk: its config, its weights by module path, and their digest."""

    path: Path
    kind: str  # "lora" | "dora"
    scale: float
    rank: int
    layers: dict[str, dict[str, mx.array]]  # module path -> {"lora_a", "lora_b"[, "m"]}
    digest: str  # sha256 of the config and weights files

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for parts in self.layers.values() for a in parts.values())


def files_digest(path: Path) -> str:
    """The sha256 of an adapter directory's config and weights files (what its fingerprint is made of)."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        digest.update(name.encode() + b"\0")
        with (path / name).open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def read_adapter(path: Path) -> AdapterFiles:
    """Read an ``mlx_lm.lora`` output directory (``adapter_config.json`` + ``adapters.safetensors``).

    Raises:
        AdapterError: files missing or unreadable, a full fine-tune (a model, not an adapter), or weights that
            are not LoRA/DoRA factors.
    """
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError as exc:
        raise AdapterError(f"{path} is not an mlx_lm.lora adapter: it has no {CONFIG_FILE}") from exc
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {path / CONFIG_FILE}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path / CONFIG_FILE} is not a JSON object")
    kind = str(config.get("fine_tune_type", "lora"))
    if kind == "full":
        raise AdapterError(
            f"{path} is a full fine-tune: it is a model, not an adapter (serve it as a model with --model or "
            "[[models]])"
        )
    if kind not in ("lora", "dora"):
        raise AdapterError(f"{path}: fine_tune_type '{kind}' is not served (lora and dora are)")
    params = config.get("lora_parameters") or {}
    if not isinstance(params, dict) or "scale" not in params:
        raise AdapterError(f"{path / CONFIG_FILE} has no lora_parameters.scale")
    if not (path / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{path} is not an mlx_lm.lora adapter: it has no {WEIGHTS_FILE}")
    try:
        weights = mx.load(str(path / WEIGHTS_FILE))
    except Exception as exc:  # mlx raises RuntimeError/ValueError for a bad file
        raise AdapterError(f"cannot read {path / WEIGHTS_FILE}: {exc}") from exc
    assert isinstance(weights, dict)
    layers: dict[str, dict[str, mx.array]] = {}
    for name, array in weights.items():
        module, _, leaf = name.rpartition(".")
        if leaf not in _LEAVES or not module:
            raise AdapterError(f"{path}: '{name}' is not a LoRA or DoRA parameter")
        layers.setdefault(module, {})[leaf] = array
    for module, parts in layers.items():
        if "lora_a" not in parts or "lora_b" not in parts:
            raise AdapterError(f"{path}: '{module}' lacks lora_a or lora_b")
        if (kind == "dora") != ("m" in parts):
            raise AdapterError(f"{path}: '{module}' does not match fine_tune_type '{kind}'")
    if not layers:
        raise AdapterError(f"{path / WEIGHTS_FILE} holds no adapter weights")
    rank = max(int(p["lora_a"].shape[-1]) for p in layers.values())
    return AdapterFiles(path, kind, float(params["scale"]), rank, layers, files_digest(path))


def _dense_weight(linear: Any) -> mx.array:
    weight = linear.weight
    if isinstance(linear, nn.QuantizedLinear):
        weight = mx.dequantize(
            weight, linear.scales, linear.biases, group_size=linear.group_size, bits=linear.bits, mode=linear.mode
        )
    return weight


class AdaptedLinear(nn.Module):
    """A base linear layer plus, by adapter index, every loaded adapter's factors for it."""

    def __init__(self, base: Any, bank: AdapterBank) -> None:
        super().__init__()
        self.base = base
        out_dims, in_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):
            in_dims = in_dims * 32 // base.bits
        self.in_dims, self.out_dims = int(in_dims), int(out_dims)
        self._bank = bank
        # By stack index (adapter index - 1), laid out so that every adapter's block of one factor is one matrix
        # (``a.reshape(in, slots * rank)``, ``b.reshape(slots * rank, out)``: free reshapes); underscored so
        # that they are not the model's parameters.
        self._a: mx.array | None = None  # (in, slots, rank)
        self._b: mx.array | None = None  # (slots, rank, out), scale folded in
        self._g: mx.array | None = None  # (slots, out): DoRA's factor (1 for LoRA rows and the base); None: no DoRA
        self._used: set[int] = set()

    @property
    def dtype(self) -> mx.Dtype:
        return mx.float32 if isinstance(self.base, nn.QuantizedLinear) else self.base.weight.dtype

    def __call__(self, x: mx.array) -> mx.array:
        bank = self._bank
        y = self.base(x)
        if not bank.adapted or not self._used or self._a is None or self._b is None:
            return y
        slots, rank = self._b.shape[0], self._b.shape[1]
        # Every adapter's low-rank projection in one matrix product, each row keeping its own adapter's block
        # (zero for the base model's rows), then one product back: dense kernels, whatever the mix of rows.
        z = (x @ self._a.reshape(self.in_dims, slots * rank)) * bank.blocks(slots, rank, x.dtype)
        z = (z @ self._b.reshape(slots * rank, self.out_dims)).astype(y.dtype)
        if self._g is None:
            return y + z
        index, base_rows = bank.stack_rows()
        g = self._g[index][:, None, :]
        if base_rows is not None:
            g = mx.where(base_rows, 1.0, g)
        bias = self.base.get("bias")
        if bias is not None:
            y = y - bias
        out = (y + z) * g.astype(y.dtype)
        return out + bias if bias is not None else out

    def resize(self, slots: int, rank: int) -> None:
        """Make room for ``slots`` adapters of at most ``rank`` (zeros: no change to the output)."""
        dtype = self.dtype
        if self._a is None or self._b is None:
            self._a = mx.zeros((self.in_dims, slots, rank), dtype)
            self._b = mx.zeros((slots, rank, self.out_dims), dtype)
            return
        have, have_rank = self._b.shape[0], self._b.shape[1]
        if have >= slots and have_rank >= rank:
            return
        slots, rank = max(slots, have), max(rank, have_rank)
        a = mx.zeros((self.in_dims, slots, rank), dtype)
        b = mx.zeros((slots, rank, self.out_dims), dtype)
        a[:, :have, :have_rank] = self._a
        b[:have, :have_rank, :] = self._b
        self._a, self._b = a, b
        if self._g is not None:
            self._g = mx.concatenate([self._g, mx.ones((slots - have, self.out_dims), mx.float32)])

    def put(self, index: int, a: mx.array, b: mx.array, scale: float, m: mx.array | None) -> None:
        """Set the factors at stack ``index`` (``a``: in x r, ``b``: r x out, as mlx_lm.lora saves them)."""
        assert self._a is not None and self._b is not None
        if a.shape[0] != self.in_dims or b.shape[1] != self.out_dims or a.shape[1] != b.shape[0]:
            raise AdapterError(
                f"factors of shapes {tuple(a.shape)} and {tuple(b.shape)} do not fit a {self.in_dims} -> "
                f"{self.out_dims} layer: the adapter was trained for another model"
            )
        rank, dtype = a.shape[1], self.dtype
        a_stack, b_stack = mx.array(self._a), mx.array(self._b)
        a_stack[:, index] = 0
        b_stack[index] = 0
        a_stack[:, index, :rank] = a.astype(dtype)
        b_stack[index, :rank, :] = (scale * b.astype(mx.float32)).astype(dtype)
        self._a, self._b = a_stack, b_stack
        if m is not None:
            if self._g is None:
                self._g = mx.ones((self._b.shape[0], self.out_dims), mx.float32)
            # DoRA divides by the norm of the adapted weight, which is fixed once the adapter is.
            adapted = _dense_weight(self.base).astype(mx.float32) + scale * (
                b.astype(mx.float32).T @ a.astype(mx.float32).T
            )
            self._set_g(index, m.astype(mx.float32) / mx.linalg.norm(adapted, axis=1))
        elif self._g is not None:
            self._set_g(index, 1.0)
        self._used.add(index)

    def _set_g(self, index: int, value: mx.array | float) -> None:
        """DoRA's factor for stack ``index`` (1: none)."""
        assert self._g is not None
        g = mx.array(self._g)
        g[index] = value
        self._g = g

    def drop(self, index: int) -> None:
        """The factors at stack ``index`` no longer apply (its rows get the base layer's output)."""
        if index not in self._used or self._a is None or self._b is None:
            return
        a, b = mx.array(self._a), mx.array(self._b)
        a[:, index] = 0
        b[index] = 0
        self._a, self._b = a, b
        if self._g is not None:
            self._set_g(index, 1.0)
        self._used.discard(index)
        if not self._used:
            self._a = self._b = self._g = None

    def shrink(self, slots: int) -> None:
        """Give back the memory of stack entries from ``slots`` on (free, and last)."""
        if self._a is None or self._b is None or self._b.shape[0] <= slots:
            return
        # Copies: a slice would keep the whole buffer alive (and ``a``'s must be contiguous to reshape freely).
        self._a, self._b = mx.contiguous(self._a[:, :slots]), mx.contiguous(self._b[:slots])
        if self._g is not None:
            self._g = mx.contiguous(self._g[:slots])

    def arrays(self) -> list[mx.array]:
        return [x for x in (self._a, self._b, self._g) if x is not None]


class AdapterBank:
    """The adapters of one base model: their indices, the layers they touch, and the rows of the pass being
    built (engine thread only)."""

    def __init__(self, model: Any) -> None:
        self._model = getattr(model, "wrapped", model)  # the mlx-lm model under our logits cut, if any
        self._layers: dict[str, AdaptedLinear] = {}
        self._names: list[str | None] = [None]  # by index; 0 is the base model
        self._rank = 1
        # The pass being built: each row's adapter index (empty: no adapter row), and the arrays made from it,
        # once per pass, as the layers first ask for them.
        self._selected: list[int] = []
        self._blocks: dict[tuple[int, int, mx.Dtype], mx.array] = {}
        self._stack_rows: tuple[mx.array, mx.array | None] | None = None

    @property
    def names(self) -> list[str]:
        return [n for n in self._names if n is not None]

    def add(self, name: str, files: AdapterFiles) -> int:
        """Install ``files`` as adapter ``name``; its index (rows that use it pass it to :meth:`selected`).

        Raises:
            AdapterError: the adapter touches a layer that is not linear, or does not fit this model's shapes.
        """
        modules = dict(self._model.named_modules())
        for path in files.layers:
            module = modules.get(path)
            if isinstance(module, AdaptedLinear):
                continue
            if not isinstance(module, nn.Linear | nn.QuantizedLinear):
                what = "no such layer" if module is None else f"a {type(module).__name__}"
                raise AdapterError(
                    f"the adapter changes '{path}' ({what} in this model): only linear layers' adapters are served"
                )
        index = next((i for i, n in enumerate(self._names) if i and n is None), len(self._names))
        wrapped = [(p, AdaptedLinear(modules[p], self)) for p in files.layers if p not in self._layers]
        if index == len(self._names):
            self._names.append(None)
        self._rank = max(self._rank, files.rank)
        new = dict(wrapped)
        for layer in [*self._layers.values(), *new.values()]:
            layer.resize(len(self._names) - 1, self._rank)
        try:
            for path, parts in files.layers.items():
                layer = self._layers.get(path) or new[path]
                layer.put(index - 1, parts["lora_a"], parts["lora_b"], files.scale, parts.get("m"))
        except AdapterError:
            for layer in [*self._layers.values(), *new.values()]:
                layer.drop(index - 1)
            raise
        if wrapped:
            self._model.update_modules(tree_unflatten(wrapped))
            self._layers.update(new)
        self._names[index] = name
        mx.eval([a for layer in self._layers.values() for a in layer.arrays()])
        return index

    def remove(self, index: int) -> None:
        """Adapter ``index`` is gone (no running sequence uses it any more): its factors are zeroed, the index
        is free for the next adapter, and trailing free indices give their memory back."""
        for layer in self._layers.values():
            layer.drop(index - 1)
        self._names[index] = None
        while len(self._names) > 1 and self._names[-1] is None:
            self._names.pop()
        for layer in self._layers.values():
            layer.shrink(len(self._names) - 1)
        mx.eval([a for layer in self._layers.values() for a in layer.arrays()])

    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self._layers.values() for a in layer.arrays())

    @contextmanager
    def selected(self, rows: Sequence[int]) -> Iterator[None]:
        """Build forward passes whose row ``i`` uses adapter ``rows[i]`` (0: the base model)."""
        self._selected = list(rows) if any(rows) else []
        try:
            yield
        finally:
            self._selected, self._blocks, self._stack_rows = [], {}, None

    @property
    def adapted(self) -> bool:
        """Whether the pass being built has a row on an adapter (else the base layers alone run)."""
        return bool(self._selected)

    def stack_rows(self) -> tuple[mx.array, mx.array | None]:
        """Each row's stack index (a base-model row: 0, masked), and (batch, 1, 1) True where a row is the base
        model's (None: no such row), for DoRA's per-adapter factors."""
        if self._stack_rows is None:
            rows = self._selected
            index = mx.array([max(r - 1, 0) for r in rows], mx.uint32)
            self._stack_rows = (index, None if all(rows) else mx.array([r == 0 for r in rows])[:, None, None])
        return self._stack_rows

    def blocks(self, slots: int, rank: int, dtype: mx.Dtype) -> mx.array:
        """(batch, 1, slots * rank): ones over each row's own adapter's block of ``rank`` columns, zeros
        elsewhere (every column, for a base-model row)."""
        key = (slots, rank, dtype)
        mask = self._blocks.get(key)
        if mask is None:
            own = mx.array([r - 1 if r > 0 else slots for r in self._selected])  # slots: no block at all
            hit = mx.arange(slots)[None, :] == own[:, None]  # (batch, slots)
            mask = mx.broadcast_to(hit[:, :, None], (len(self._selected), slots, rank))
            mask = mask.reshape(len(self._selected), 1, slots * rank).astype(dtype)
            self._blocks[key] = mask
        return mask
