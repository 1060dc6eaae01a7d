"""The adapters an engine serves, each as a model of its own name: a view of its base model's
:class:`~adapters.mlx_lm.models.LoadedModel` (same weights, tokenizer and KV budget; its own name, index in the
base model's bank and fingerprint), loaded from an ``mlx_lm.lora`` directory and unloaded once no request
uses it.

An adapter's fingerprint is the sha256 of its base model's fingerprint and its files' digest: prefix caches,
automatic reuse and stored responses' KV record it like a model's, so KV computed under one adapter is never
used under another, or under the base model.

Ownership: the engine thread owns this object, the views and the banks they index (it loads and unloads
adapters between two turns, through ``MlxEngine.call``); other threads read only what ``infos`` returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from adapters.base import AdapterExists, AdapterRefused, ModelInfo
from adapters.mlx_lm.lora import AdapterError, read_adapter
from adapters.mlx_lm.models import LoadedModel
from adapters.setup import AdapterSpec

__all__ = ["ServedAdapter", "ServedAdapters"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedAdapter:
    spec: AdapterSpec
    view: LoadedModel
    nbytes: int  # its factors, as read (what it costs in memory, about)
    created: int


class ServedAdapters:
    """Adapters by name, and those unloaded while requests still ran on them (engine thread only)."""

    def __init__(self) -> None:
        self._by_name: dict[str, ServedAdapter] = {}
        self._draining: list[ServedAdapter] = []

    def all(self) -> list[ServedAdapter]:
        return list(self._by_name.values())

    def add(self, spec: AdapterSpec, base: LoadedModel) -> ServedAdapter:
        """Load ``spec`` onto ``base`` (its weights are shared, not copied).

        Raises:
            AdapterExists: an adapter of that name is served.
            AdapterRefused: the files are not an adapter that fits ``base`` (a full fine-tune, another model's).
        """
        if spec.name in self._by_name:
            raise AdapterExists(f"An adapter named '{spec.name}' is already served")
        if base.bank is None or base.parent is not None:
            raise AdapterRefused(f"'{base.spec.name}' cannot take adapters")
        started = time.perf_counter()
        try:
            files = read_adapter(Path(spec.path))
            index = base.bank.add(spec.name, files)
        except AdapterError as exc:
            raise AdapterRefused(str(exc)) from exc
        fingerprint = hashlib.sha256(f"{base.fingerprint}\0{files.digest}".encode()).hexdigest()
        view = dataclasses.replace(
            base,
            spec=dataclasses.replace(base.spec, name=spec.name),
            fingerprint=fingerprint,
            adapter=index,
            parent=base.spec.name,
            adapter_digest=files.digest,
        )
        _ = view.batchable  # built here, on the engine thread (it makes a cache); others read it
        served = ServedAdapter(spec, view, files.nbytes, int(time.time()))
        self._by_name[spec.name] = served
        logger.info(
            "adapter %s (%s, rank %d, %d layers, %.1f MB) loaded on %s from %s in %.2fs",
            spec.name,
            files.kind,
            files.rank,
            len(files.layers),
            files.nbytes / 1e6,
            base.spec.name,
            spec.path,
            time.perf_counter() - started,
        )
        return served

    def remove(self, name: str) -> ServedAdapter | None:
        """Stop serving ``name`` to new requests; its weights stay until :meth:`release` finds it unused."""
        served = self._by_name.pop(name, None)
        if served is not None:
            self._draining.append(served)
        return served

    def release(self, in_use: Iterable[LoadedModel]) -> list[ServedAdapter]:
        """Free the weights of unloaded adapters that no request in ``in_use`` (every running request's model)
        still runs on; those freed."""
        if not self._draining:
            return []
        busy = {id(m) for m in in_use}
        freed = [s for s in self._draining if id(s.view) not in busy]
        for served in freed:
            self._draining.remove(served)
            bank = served.view.bank
            assert bank is not None
            bank.remove(served.view.adapter)
            logger.info("adapter %s unloaded", served.spec.name)
        return freed

    @property
    def draining(self) -> int:
        return len(self._draining)

    def infos(self, batched: Callable[[LoadedModel], bool]) -> list[ModelInfo]:
        """What ``/v1/models`` lists for each adapter (``batched``: whether a model's requests batch)."""
        out = []
        for served in self._by_name.values():
            view = served.view
            out.append(
                ModelInfo(
                    id=served.spec.name,
                    created=served.created,
                    owned_by=served.spec.owner or "mlx-gateway",
                    context_length=view.context_length,
                    ready=True,
                    source=served.spec.path,
                    fingerprint=view.fingerprint,
                    kv_bytes_per_token=view.kv_bytes_per_token,
                    kv_budget=view.kv_budget,
                    batched=batched(view),
                    parent=view.parent,
                    owner=served.spec.owner,
                    adapter_fingerprint=view.adapter_digest,
                    adapter_bytes=served.nbytes,
                )
            )
        return out
