"""What MKL's float32 GEMM results depend on, per Conditional Numerical Reproducibility (CNR) setting:
the arrays' alignment, the batch's row count, the thread count and the CPU; and what each setting costs.

    python -m bench.mkl_cnr                      # every setting, MKL from this environment
    python -m bench.mkl_cnr --mkl /path/libmkl_rt.so.3 --out probe.json
    python -m bench.mkl_cnr --compare a.json b.json   # the same bits on two machines?

Only numpy and MKL (through ctypes): no mlx, so that it runs wherever the MKL libraries can be carried.
Each setting runs in a fresh process, since MKL reads ``MKL_CBWR`` once. The products are the ones mlx's
CPU backend hands to ``cblas_sgemm`` in a decode step (``MKL_VERBOSE=1`` shows them): ``x @ W.T`` with one
row per sequence for the projections and the output head, and attention's ``q @ K.T`` and ``p @ V``. mlx's
CPU allocator puts an 8-byte header before each buffer, so its arrays start 8 bytes past a 16-byte boundary
and their alignment to 64 bytes depends on what was allocated before: that is what ``align`` varies.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# Each setting: environment variables for MKL ("unset": none of them).
SETTINGS = (
    "unset",
    "MKL_CBWR=AUTO",
    "MKL_CBWR=AUTO MKL_DYNAMIC=FALSE",
    "MKL_CBWR=COMPATIBLE",
    "MKL_CBWR=AVX2",
    "MKL_CBWR=AUTO,STRICT",
)
_MKL_VARS = ("MKL_CBWR", "MKL_DYNAMIC", "MKL_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS")


def setting_env(setting: str) -> dict[str, str]:
    """This process's environment with ``setting``'s MKL variables instead of its own."""
    env = {k: v for k, v in os.environ.items() if k not in _MKL_VARS}
    if setting != "unset":
        env.update(item.split("=", 1) for item in setting.split())
    return env


# (name, rows, k, n, transposed B): C(rows, n) = A(rows, k) @ B.T (B is (n, k)), or A @ B (B is (k, n)).
SHAPES = (
    ("tiny q/o proj", 1, 128, 128, True),
    ("tiny kv proj", 1, 128, 64, True),
    ("tiny mlp up", 1, 128, 256, True),
    ("tiny mlp down", 1, 256, 128, True),
    ("tiny head 32k", 1, 128, 32000, True),
    ("attn q@K.T L=300", 1, 32, 300, True),
    ("attn p@V L=300", 1, 300, 32, False),
    ("small mlp up", 1, 512, 1536, True),
    ("small mlp down", 1, 1536, 512, True),
    ("small head 32k", 1, 512, 32000, True),
    ("1b mlp up", 1, 2048, 8192, True),
    ("1b mlp down", 1, 8192, 2048, True),
    ("prefill 128x512x1536", 128, 512, 1536, True),
)
ALIGNS = (0, 8, 24, 40, 56)  # byte offsets from a 64-byte boundary
ROWS = (2, 4, 8)

_RowMajor, _NoTrans, _Trans = 101, 111, 112


def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.cblas_sgemm.argtypes = [i, i, i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
    lib.cblas_sgemm.restype = None
    return lib


def _placed(values: np.ndarray, offset: int, keep: list[np.ndarray]) -> np.ndarray:
    """A copy of ``values`` whose data starts ``offset`` bytes past a 64-byte boundary."""
    raw = np.empty(values.size + 32, np.float32)
    keep.append(raw)
    shift = ((offset - raw.ctypes.data) % 64) // 4
    out = raw[shift : shift + values.size].reshape(values.shape)
    out[...] = values
    assert out.ctypes.data % 64 == offset
    return out


def _gemm(
    lib: ctypes.CDLL, a: np.ndarray, b: np.ndarray, trans_b: bool, align: tuple[int, int, int], calls: int = 1
) -> tuple[np.ndarray, float]:
    """``a @ b.T`` (or ``a @ b``) with each array placed at its ``align``; the result and seconds a call."""
    keep: list[np.ndarray] = []
    rows, k = a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    pa, pb = _placed(a, align[0], keep), _placed(b, align[1], keep)
    pc = _placed(np.zeros((rows, n), np.float32), align[2], keep)
    args = (
        _RowMajor, _NoTrans, _Trans if trans_b else _NoTrans, rows, n, k, 1.0,
        pa.ctypes.data, k, pb.ctypes.data, b.shape[1], 0.0, pc.ctypes.data, n,
    )  # fmt: skip
    lib.cblas_sgemm(*args)
    started = time.perf_counter()
    for _ in range(calls - 1):
        lib.cblas_sgemm(*args)
    return pc.copy(), (time.perf_counter() - started) / max(1, calls - 1)


def _inputs(rows: int, k: int, n: int, trans_b: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((max(rows, *ROWS), k), dtype=np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32) / np.float32(np.sqrt(k))
    return a, b


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def child(mkl: str, repeats: int) -> dict[str, Any]:
    """One setting (already in the environment): what its results depend on, their digests, its speed."""
    lib = _load(mkl)
    branch = lib.MKL_CBWR_Get(1)  # MKL_CBWR_BRANCH
    threads = lib.MKL_Get_Max_Threads()
    shapes = []
    for seed, (name, rows, k, n, trans_b) in enumerate(SHAPES):
        a, b = _inputs(rows, k, n, trans_b, seed)
        x = a[:rows]
        ref, _ = _gemm(lib, x, b, trans_b, (8, 8, 8))
        aligned = [_gemm(lib, x, b, trans_b, (o, o2, o))[0] for o in ALIGNS for o2 in ALIGNS[:3]]
        by_rows = {r: _gemm(lib, a[:r], b, trans_b, (8, 8, 8))[0][:rows] for r in ROWS if r > rows}
        lib.MKL_Set_Num_Threads_Local(1)
        one_thread, _ = _gemm(lib, x, b, trans_b, (8, 8, 8))
        lib.MKL_Set_Num_Threads_Local(0)
        calls = max(3, min(200, int(2e8 / (2 * rows * k * n))))
        times = [_gemm(lib, x, b, trans_b, (8, 8, 8), calls)[1] for _ in range(repeats)]
        shapes.append(
            {
                "shape": name,
                "inputs_sha256": hashlib.sha256(a.tobytes() + b.tobytes()).hexdigest()[:16],
                "result_sha256": hashlib.sha256(ref.tobytes()).hexdigest()[:16],
                "alignment_changes_bits": any(not np.array_equal(r, ref) for r in aligned),
                "alignment_max_diff": max(float(np.abs(r - ref).max()) for r in aligned),
                "row_counts_that_change_bits": [r for r, out in by_rows.items() if not np.array_equal(out, ref)],
                "one_thread_changes_bits": not np.array_equal(one_thread, ref),
                "us_per_call": statistics.median(times) * 1e6,
            }
        )
    maps = Path("/proc/self/maps").read_text()
    kernels = sorted({line.rsplit("/", 1)[-1] for line in maps.splitlines() if "libmkl_" in line})
    return {"branch": branch, "threads": threads, "kernels": kernels, "shapes": shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mkl", default=str(Path(sys.prefix) / "lib" / "libmkl_rt.so.3"))
    parser.add_argument("--settings", default=";".join(SETTINGS), help="settings, ';' between (see SETTINGS)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compare", nargs=2, type=Path, help="two result files: which digests agree")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.mkl, args.repeats)))
        return
    if args.compare:
        compare(*args.compare)
        return
    result: dict[str, Any] = {"cpu": _cpu(), "cores": os.cpu_count(), "mkl": args.mkl, "settings": {}}
    print(f"{result['cpu']} ({result['cores']} cores), {args.mkl}")
    for setting in args.settings.split(";"):
        cmd = [sys.executable, "-m", "bench.mkl_cnr", "--child", "--mkl", args.mkl, "--repeats", str(args.repeats)]
        env = setting_env(setting)
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        if run.returncode != 0:
            print(f"{setting}: failed\n{run.stderr[-2000:]}")
            continue
        out = result["settings"][setting] = json.loads(run.stdout)
        print(f"\n{setting}: branch {out['branch']}, {out['threads']} threads, {' '.join(out['kernels'])}")
        base = result["settings"].get("unset")
        for i, s in enumerate(out["shapes"]):
            speed = f"{s['us_per_call']:9.1f} us"
            if base and setting != "unset":
                speed += f" ({s['us_per_call'] / base['shapes'][i]['us_per_call']:.2f}x unset)"
            flags = [
                f"align {s['alignment_max_diff']:.1e}" if s["alignment_changes_bits"] else "",
                f"rows {s['row_counts_that_change_bits']}" if s["row_counts_that_change_bits"] else "",
                "threads" if s["one_thread_changes_bits"] else "",
            ]
            print(f"  {s['shape']:>22}: {s['result_sha256']} {speed}  changes with: {' '.join(f for f in flags if f)}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


def compare(a: Path, b: Path) -> None:
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    print(f"{a}: {ra['cpu']}\n{b}: {rb['cpu']}")
    for setting in ra["settings"]:
        if setting not in rb["settings"]:
            continue
        pairs = zip(ra["settings"][setting]["shapes"], rb["settings"][setting]["shapes"], strict=True)
        same = [x["shape"] for x, y in pairs if x["result_sha256"] == y["result_sha256"]]
        assert all(
            x["inputs_sha256"] == y["inputs_sha256"]
            for x, y in zip(ra["settings"][setting]["shapes"], rb["settings"][setting]["shapes"], strict=True)
        ), "the two machines made other inputs"
        print(f"{setting}: {len(same)}/{len(ra['settings'][setting]['shapes'])} results bit-identical")


if __name__ == "__main__":
    main()
