"""float32 matmul speed of mlx's CPU backend with each BLAS candidate (each in a fresh process, since a
BLAS must be loaded before mlx): ``python -m bench.blas``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.harness import ROOT, write_result

PROBE = r"""
import ctypes, json, sys, time
if sys.argv[1] != "none":
    ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
import mlx.core as mx
mx.set_default_device(mx.cpu)
out = {}
for m, k, n in ((512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (1, 4096, 4096)):
    a = mx.random.normal((m, k)); b = mx.random.normal((k, n)); mx.eval(a, b); mx.eval(a @ b)
    times = []
    for _ in range(5):
        t = time.perf_counter(); mx.eval(a @ b); times.append(time.perf_counter() - t)
    out[f"{m}x{k}@{k}x{n}"] = 2 * m * k * n / sorted(times)[2] / 1e9
print(json.dumps(out))
"""


def candidates() -> dict[str, str]:
    found = {"mlx reference BLAS": "none"}
    mkl = Path(sys.prefix) / "lib" / "libmkl_rt.so.3"
    if mkl.exists():
        found["MKL (PyPI mkl)"] = str(mkl)
    openblas = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
    if openblas.exists():
        found["OpenBLAS (Debian)"] = str(openblas)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for name, lib in candidates().items():
        gflops = json.loads(subprocess.check_output([sys.executable, "-c", PROBE, lib], cwd=ROOT))
        rows.append({"blas": name, "library": lib, "gflops": gflops})
        print(name, {k: round(v, 1) for k, v in gflops.items()}, flush=True)
    write_result("blas", "cpu", "none", rows, out=args.out)


if __name__ == "__main__":
    main()
