"""An optimised BLAS for mlx's Linux CPU backend.

The ``mlx-cpu`` wheel links the netlib reference BLAS (``libblas-*.so``): float32 matmul ran at about
6 GFLOP/s on our 2-core AMD EPYC. ``cblas_sgemm`` is resolved dynamically, so a BLAS loaded with
``RTLD_GLOBAL`` *before* mlx takes its place. We ship MKL through the ``mkl`` wheel (the ``cpu`` extra):
measured here, MKL gave 168-193 GFLOP/s for 512-2048 square matmuls and 11.5 GFLOP/s for the 1x4096
matrix-vector product that dominates decoding; Debian's OpenBLAS 141-199 and 7.4, but it is not
installable from PyPI, and ``scipy-openblas32`` prefixes its symbols so it cannot stand in.
Set ``MLX_GATEWAY_BLAS`` to a library path to choose another one, or to ``none`` to keep mlx's own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BlasInfo", "load_optimised_blas"]

logger = logging.getLogger(__name__)

_loaded: BlasInfo | None = None


@dataclass(frozen=True)
class BlasInfo:
    name: str  # "mkl", "custom", "reference" or "accelerate"/"cuda" where BLAS is not ours to pick
    path: str | None
    fast: bool


def _candidates() -> list[Path]:
    libdirs = {Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"}
    return [d / name for d in sorted(libdirs) for name in ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so")]


def load_optimised_blas(override: str | None = None) -> BlasInfo:
    """Load the best BLAS we can find, once, before ``mlx.core`` is imported.

    Args:
        override: a library path, ``"none"``, or None to search for MKL.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    if platform.system() != "Linux":
        _loaded = BlasInfo("accelerate" if platform.system() == "Darwin" else "reference", None, True)
        return _loaded
    if "mlx.core" in sys.modules:
        logger.warning("mlx was imported before the BLAS could be chosen; it keeps its reference BLAS")
    choice = override if override is not None else os.environ.get("MLX_GATEWAY_BLAS")
    if choice == "none":
        _loaded = BlasInfo("reference", None, False)
        return _loaded
    paths = [Path(choice)] if choice else _candidates()
    for path in paths:
        if not path.exists():
            continue
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            logger.warning("could not load BLAS %s: %s", path, exc)
            continue
        _loaded = BlasInfo("mkl" if "mkl" in path.name else "custom", str(path), True)
        return _loaded
    _loaded = BlasInfo("reference", None, False)
    return _loaded
