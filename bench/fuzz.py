"""The OpenAPI document fuzzed for longer than the test suite does: ``python -m bench.fuzz [--examples N]``.

Starts the real server on the tiny model (64-token context, ``default_max_tokens = 8``, a prefix-cache
directory in a temporary folder), runs schemathesis with every check and the allowances of
``tests/integration/schemathesis.toml`` (each explained there), and records operations, test cases,
failures and the duration in ``bench/results/fuzz-cpu-tiny.json``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import ROOT, free_port, server_process, write_result

CONFIG = """
[[models]]
name = "tiny"
path = "tiny"
context_length = 64
default_max_tokens = 8
"""
SETTINGS = ROOT / "tests" / "integration" / "schemathesis.toml"


def main() -> None:
    from bench.harness import bench_parser

    parser = bench_parser(__doc__)
    parser.add_argument("--examples", type=int, default=300, help="test cases per operation and phase (at most)")
    parser.add_argument("--seed", type=int, default=20261129)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "gateway.toml").write_text(CONFIG)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "gateway.cli.main",
            "serve",
            "--port",
            str(port),
            "--config",
            str(folder / "gateway.toml"),
        ]
        cmd += ["--cache-dir", str(folder / "caches")]
        with server_process(cmd, url, folder / "server.log", {"PYTHONUNBUFFERED": "1"}):
            st = [str(Path(sys.executable).with_name("st")), "--config-file", str(SETTINGS), "--no-color", "run"]
            st += [f"{url}/docs/openapi.json", "--checks", "all", "--max-examples", str(args.examples)]
            st += [
                "--seed",
                str(args.seed),
                "--workers",
                "1",
                "--request-timeout",
                "60",
                "--generation-database",
                "none",
            ]
            start = time.monotonic()
            done = subprocess.run(st, cwd=folder, capture_output=True, text=True)
            seconds = time.monotonic() - start
    out = done.stdout
    print(out[-6000:])
    tested = re.search(r"Tested: (\d+)", out)
    generated = re.search(r"(\d+) generated", out)
    failures = re.search(r"(\d+) unique failures", out)
    row = {
        "examples_per_operation": args.examples,
        "seed": args.seed,
        "operations": int(tested[1]) if tested else 0,
        "test_cases": int(generated[1]) if generated else 0,
        "failures": int(failures[1]) if failures else 0,
        "exit_code": done.returncode,
        "seconds": round(seconds, 1),
        "st_command": "st --config-file tests/integration/schemathesis.toml run URL/docs/openapi.json --checks all "
        f"--max-examples {args.examples} --seed {args.seed} --workers 1 --request-timeout 60 "
        "--generation-database none",
        "summary": out[out.rfind("SUMMARY") :].strip() if "SUMMARY" in out else out[-2000:],
    }
    write_result("fuzz", args.device, "tiny", [row], out=args.out)


if __name__ == "__main__":
    main()
