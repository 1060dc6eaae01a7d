"""An optimised BLAS for mlx's Linux CPU backend, set up for run-to-run identical results.

The ``mlx-cpu`` wheel links the netlib reference BLAS (``libblas-*.so``): float32 matmul ran at about
6 GFLOP/s on our 2-core AMD EPYC. ``cblas_sgemm`` is resolved dynamically, so a BLAS loaded with
``RTLD_GLOBAL`` *before* mlx takes its place. We ship MKL through the ``mkl`` wheel (the ``cpu`` extra):
measured here, MKL gave 168-193 GFLOP/s for 512-2048 square matmuls and 11.5 GFLOP/s for the 1x4096
matrix-vector product that dominates decoding; Debian's OpenBLAS 141-199 and 7.4, but it is not
installable from PyPI, and ``scipy-openblas32`` prefixes its symbols so it cannot stand in.
The gateway's ``blas`` setting (``--blas``, ``MLX_GATEWAY_BLAS``), passed in by the caller, names a library
to load instead, or ``none`` to keep mlx's own; this module reads no setting of ours from the environment.

**Reproducibility.** MKL documents bitwise run-to-run identical results only in its Conditional Numerical
Reproducibility (CNR) mode and on a fixed number of threads: otherwise it may pick its code path by the
arrays' memory alignment and, with ``MKL_DYNAMIC``, the number of threads per call. mlx's CPU allocator puts
an 8-byte header before every buffer, so an array's alignment depends on everything allocated before it.
We turn CNR on with the ``AUTO`` branch (this CPU's own fastest code path) and fix the thread count
(``MKL_DYNAMIC`` off; ``MKL_NUM_THREADS``, by default the physical cores). Measured (``bench/NOTES.md``,
"MKL reproducibility"): the same bits as MKL's default for every decode-step product on our AMD EPYC, no
measurable cost there or on an Intel Xeon. What it cannot remove: a product's bits depend on its shapes,
the batch's row count included, in every non-strict mode. An ``MKL_CBWR`` or ``MKL_DYNAMIC`` set in the
environment is left as it is.
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

# mkl_service.h: MKL_CBWR_Get(MKL_CBWR_BRANCH) reads the branch; MKL_CBWR_AUTO is the CPU's own best one.
_MKL_CBWR_BRANCH = 1
_MKL_CBWR_AUTO = 2
_BRANCHES = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 8: "SSE4_2", 9: "AVX", 10: "AVX2", 13: "AVX512"}
_MKL_CBWR_STRICT = 0x10000


@dataclass(frozen=True)
class BlasInfo:
    name: str  # "mkl", "custom", "reference" or "accelerate"/"cuda" where BLAS is not ours to pick
    path: str | None
    fast: bool
    # MKL's settings for run-to-run identical results, e.g. "MKL_CBWR=AUTO, MKL_DYNAMIC=FALSE, 16 threads";
    # empty where the library is not MKL.
    reproducibility: str = ""


def _candidates() -> list[Path]:
    libdirs = {Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"}
    return [d / name for d in sorted(libdirs) for name in ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so")]


def _reproducible(mkl: ctypes.CDLL) -> str:
    """CNR on (``AUTO``) and the thread count fixed, unless the environment already says; what is in force.
    Must run before MKL's first computation."""
    if "MKL_CBWR" not in os.environ:
        status = mkl.MKL_CBWR_Set(_MKL_CBWR_AUTO)
        if status != 0:
            logger.warning("MKL refused its reproducible mode (MKL_CBWR_Set returned %d)", status)
    if "MKL_DYNAMIC" not in os.environ:
        mkl.MKL_Set_Dynamic(0)
    branch = mkl.MKL_CBWR_Get(_MKL_CBWR_BRANCH)
    name = _BRANCHES.get(branch & ~_MKL_CBWR_STRICT, str(branch)) + (",STRICT" if branch & _MKL_CBWR_STRICT else "")
    dynamic = "TRUE" if mkl.MKL_Get_Dynamic() else "FALSE"
    return f"MKL_CBWR={name}, MKL_DYNAMIC={dynamic}, {mkl.MKL_Get_Max_Threads()} threads"


def load_optimised_blas(override: str | None = None, reproducible: bool = True) -> BlasInfo:
    """Load the best BLAS we can find, once, before ``mlx.core`` is imported.

    Args:
        override: a library path, ``"none"``, or None (or empty) to search for MKL: the config's ``blas``.
        reproducible: put MKL in its reproducible mode (see the module's docstring); False only to measure
            what that mode costs.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    if platform.system() != "Linux":
        _loaded = BlasInfo("accelerate" if platform.system() == "Darwin" else "reference", None, True)
        return _loaded
    if "mlx.core" in sys.modules:
        logger.warning("mlx was imported before the BLAS could be chosen; it keeps its reference BLAS")
    choice = override
    if choice == "none":
        _loaded = BlasInfo("reference", None, False)
        return _loaded
    paths = [Path(choice)] if choice else _candidates()
    for path in paths:
        if not path.exists():
            continue
        try:
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            logger.warning("could not load BLAS %s: %s", path, exc)
            continue
        is_mkl = "mkl" in path.name
        settings = _reproducible(lib) if is_mkl and reproducible else ""
        if settings:
            logger.info("MKL in its reproducible mode: %s", settings)
        _loaded = BlasInfo("mkl" if is_mkl else "custom", str(path), True, settings)
        return _loaded
    _loaded = BlasInfo("reference", None, False)
    return _loaded
