"""The engine layouts side by side: one stream and 32 clients (burst) on the same model, in one run.

    python -m bench.layouts --device cpu --rounds 3                     # smollm2-135m, the real model
    python -m bench.layouts --device cpu --rounds 3 --before .before    # and an older tree's server

Each round runs ``bench.concurrency`` (balanced mode, no mlx_lm.server) once per variant: ``thread`` (the engine
in the server's process), ``process`` (its own process) and, with ``--before DIR``, the server of an older
checkout (``git archive <rev> gateway adapters prefix_caches bench pyproject.toml | tar x -C DIR``), which
predates the choice. Rounds interleave the variants, so that a machine's drift touches each alike; the medians
over rounds are reported, with every round's figures.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import DEFAULT_MODEL, bench_parser, write_result

ROOT = Path(__file__).resolve().parent.parent


def one_round(variant: str, cwd: Path, model: str, device: str, clients: str, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.concurrency", "--device", device, "--model", model, "--clients", clients]
    cmd += ["--modes", "balanced", "--skip-mlx-lm", "--skip-shared", "--out", str(out)]
    if variant in ("thread", "process"):
        cmd += ["--layouts", variant]
    subprocess.run(cmd, cwd=cwd, check=True)
    rows = json.loads(out.read_text())["rows"]
    return {f"{r['clients']}": r for r in rows if "clients" in r}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,32")
    parser.add_argument("--before", type=Path, default=None, help="an older tree to measure beside")
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    variants = {"thread": ROOT, "process": ROOT}
    if args.before is not None:
        variants["before"] = args.before.resolve()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for variant, cwd in variants.items():
                print(f"round {i + 1}: {variant}", flush=True)
                runs[variant].append(one_round(variant, cwd, model, args.device, args.clients, Path(tmp) / "r.json"))
    rows = []
    for variant, rounds in runs.items():
        for clients in args.clients.split(","):
            tps = [r[clients]["tokens_per_s"] for r in rounds]
            ttft = [r[clients]["ttft_p95"] for r in rounds]
            rows.append(
                {
                    "variant": variant,
                    "clients": int(clients),
                    "tokens_per_s_median": statistics.median(tps),
                    "ttft_p95_median": statistics.median(ttft),
                    "tokens_per_s": tps,
                    "ttft_p95": ttft,
                }
            )
            print(
                f"{variant:8} {clients:>3} clients: {statistics.median(tps):8.1f} tok/s  p95 TTFT "
                f"{statistics.median(ttft):.3f} s  rounds {tps}",
                flush=True,
            )
    write_result("layouts", args.device, model, rows, notes=f"{args.rounds} rounds, medians", out=args.out)


if __name__ == "__main__":
    main()
