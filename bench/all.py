"""Every benchmark in one command: ``python -m bench.all --device cpu [--quick]``.

``--quick`` (under 10 minutes on the 2-core CPU machine) uses fewer repeats, clients and tokens (and a
2-minute soak instead of 30) and
writes to ``bench/results/history/quick-DATE/``, which ``bench.report`` leaves out; a full run writes each
result to its default place (``bench/results/NAME-DEVICE-MODEL[-CARD].json``, replacing the run before it)
and regenerates ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time

from bench.harness import RESULTS, ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--model")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quick_dir = RESULTS / "history" / f"quick-{dt.datetime.now(dt.UTC):%Y-%m-%d}"
    model = ["--model", args.model] if args.model else []
    dev = ["--device", args.device]
    runs = [
        ["bench.ttft", *dev, *model, *(["--quick"] if args.quick else [])],
        ["bench.overhead", *dev, *model, *(["--repeats", "1", "--max-tokens", "48"] if args.quick else [])],
        ["bench.kvquant", *dev, *model, *(["--prompts", "6", "--tokens", "16"] if args.quick else [])],
        [
            "bench.concurrency",
            *dev,
            *model,
            *(
                [
                    "--clients",
                    "1,8",
                    "--strict-clients",
                    "1",
                    "--max-tokens",
                    "24",
                    "--shared-max-tokens",
                    "8",
                    "--shared-clients",
                    "2",
                ]
                if args.quick
                else []
            ),
        ],
    ]
    quick = ["--quick"] if args.quick else []
    runs += [["bench.saveload", *dev, *model, *quick], ["bench.bandwidth", *dev, *model, *quick]]
    runs.append(
        [
            "bench.structured",
            *dev,
            *model,
            *(["--repeats", "1", "--max-tokens", "32", "--clients", "1", "4"] if args.quick else []),
        ]
    )
    runs.append(["bench.grammar_libs", *dev, *model, *(["--repeats", "1", "--skip-outlines"] if args.quick else [])])
    if args.device == "cpu":
        runs.insert(0, ["bench.blas"])
        runs.append(["bench.soak", *dev, *model, *quick])  # 30 minutes unless --quick
    failed = []
    for run in runs:
        name = run[0].split(".")[1]
        # a full run leaves each benchmark its default file (named by harness.result_path)
        out = []
        if args.quick:
            quick_dir.mkdir(parents=True, exist_ok=True)
            model_name = args.model or ("none" if name == "blas" else "default")
            out = ["--out", str(quick_dir / f"{name}-{args.device}-{model_name}.json")]
        start = time.perf_counter()
        print(f"== {' '.join(run)}", flush=True)
        code = subprocess.call([sys.executable, "-m", *run, *out], cwd=ROOT)
        print(f"== {name}: exit {code} in {time.perf_counter() - start:.0f}s", flush=True)
        if code:
            failed.append(name)
    if not args.quick:
        subprocess.call([sys.executable, "-m", "bench.report"], cwd=ROOT)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
