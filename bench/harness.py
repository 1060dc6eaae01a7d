"""What every benchmark shares: the real server on a free port, real-text prompts of exact token
lengths, repeats with median and spread, and result files that say where and how they were made."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import inspect
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from adapters.mlx_lm.blas import load_optimised_blas

# Before anything here imports mlx (tokenizers, in-process measurements): the CPU BLAS is chosen once.
load_optimised_blas()

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_MODEL = {"cpu": "small", "gpu": "llama-8b"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


@contextmanager
def server_process(
    cmd: list[str], url: str, log: Path, env: dict[str, str] | None = None, any_answer: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server command, wait until ``url``/health answers (200, or anything with ``any_answer``),
    and stop it afterwards."""
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 1800  # an 8B build on a fresh GPU machine takes minutes
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}); see {log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200 or any_answer:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready; see {log}")
            time.sleep(0.25)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def gateway(model: str, cache_dir: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[Gateway]:
    """Start ``mlx-gateway serve`` (the real server) and wait until it is ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gateway.cli.main", "serve", "--model", model, "--port", str(port)]
    cmd += ["--cache-dir", str(cache_dir)]
    with server_process(cmd, url, log, {"PYTHONUNBUFFERED": "1", **(env or {})}) as proc:
        yield Gateway(url, proc)


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--device``, ``--model`` (default per device), ``--out``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument(
        "--model", help=f"a preset, a registry model (smollm2-135m), a .gguf file or a path (default: {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--out", type=Path, help="the result file (default: bench/results/NAME-DEVICE-MODEL[-CARD].json)"
    )
    return parser


def corpus_text() -> str:
    """Real English prose: the docstrings of standard-library modules, in a fixed order."""
    import importlib

    names = [
        "argparse",
        "asyncio",
        "collections",
        "contextlib",
        "csv",
        "dataclasses",
        "datetime",
        "decimal",
        "email",
        "functools",
        "heapq",
        "http.client",
        "inspect",
        "itertools",
        "json",
        "logging",
        "os",
        "pathlib",
        "pickle",
        "re",
        "shutil",
        "socket",
        "sqlite3",
        "statistics",
        "string",
        "subprocess",
        "tarfile",
        "threading",
        "typing",
        "unittest",
        "urllib.request",
        "uuid",
        "zipfile",
    ]
    parts = []
    for name in names:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(dict.fromkeys(parts))


class Texts:
    """Cuts real text to exact token lengths with the served model's own tokenizer."""

    def __init__(self, model: str) -> None:
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        from adapters.mlx_lm.models import ModelSpec, _resolve

        # The gateway's own resolution: a preset, a registry model (fetched and converted), a GGUF file or a
        # directory.
        self.tok = load_tokenizer(Path(_resolve(ModelSpec(model, model))))
        self.ids = self.tok.encode(corpus_text(), add_special_tokens=False)

    def text(self, tokens: int, offset: int = 0) -> str:
        """About ``tokens`` tokens of text (decoding and re-encoding can move the count by one or two)."""
        assert offset + tokens <= len(self.ids), "corpus too short"
        return self.tok.decode(self.ids[offset : offset + tokens])

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))


def summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "device": device,
    }
    with suppress(OSError, StopIteration):
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    if device == "gpu":
        try:
            info["gpu"] = subprocess.check_output(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], text=True
            ).strip()
        except (OSError, subprocess.CalledProcessError):
            info["gpu"] = "unknown"
    return info


def versions() -> dict[str, str]:
    out = {}
    for dist in ("mlx", "mlx-lm", "litestar", "uvicorn", "msgspec", "openai"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def card(gpu: str) -> str:
    """A GPU's short name for result files, from nvidia-smi's: "NVIDIA H100 80GB HBM3, 81559 MiB" -> "h100"."""
    words = [w for w in re.split(r"[\s,_-]+", gpu.lower()) if w not in {"nvidia", "tesla", "geforce", "rtx", ""}]
    for word in words:
        if re.fullmatch(r"[a-z]*\d+[a-z]*", word) and not re.fullmatch(r"\d+(gb|mib|mb)", word):
            return word
    return words[0] if words else "unknown"


def result_path(name: str, device: str, model: str, info: dict[str, Any] | None = None) -> Path:
    """Where a run's result goes by default: the top level of bench/results, named by benchmark, device,
    model and, for a GPU, card (``ttft-gpu-llama-8b-h100.json``, ``conversation-cpu-smollm2-135m.json``).

    The top level holds the newest run of each; older ones move to ``bench/results/history/`` by hand
    (bench/NOTES.md says how), and ``bench.report`` renders the top level only.
    """
    parts = [name, device] + ([model] if model not in ("", "-") else [])
    if device == "gpu":
        parts.append(card((info or machine(device)).get("gpu", "unknown")))
    return RESULTS / f"{'-'.join(parts)}.json"


def write_result(
    name: str, device: str, model: str, rows: list[dict[str, Any]], notes: str = "", out: Path | None = None
) -> Path:
    info = machine(device)
    path = out or result_path(name, device, model, info)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "model": model,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info,
        "versions": versions(),
        "command": "python -m " + " ".join([f"bench.{name.replace('-', '_')}", *sys.argv[1:]]),
        "rows": rows,
        "notes": notes,
    }
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path
