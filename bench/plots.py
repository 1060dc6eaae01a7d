"""The figures of bench/RESULTS.md, drawn from the result files (matplotlib: the ``bench`` extra)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def _ttft(ax: Any, result: dict[str, Any]) -> None:
    rows = result["rows"]
    modes = ["full", "cold", "hot", "floor"]
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [(r[mode]["ttft"] if mode != "floor" else r[mode])["median"] * 1e3 for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=mode)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], [r["scenario"] for r in rows])
    ax.set_ylabel("time to first token, ms (log)")
    ax.set_yscale("log")
    ax.legend()


def _concurrency(ax: Any, result: dict[str, Any]) -> None:
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in result["rows"]:
        if "scenario" not in r:
            lines[r["server"]].append((r["clients"], r["tokens_per_s"]))
    for server, points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=server)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("aggregate tokens/s")
    ax.legend()


def _soak(ax: Any, result: dict[str, Any]) -> None:
    row = result["rows"][0]
    samples = row["samples"]
    warmup = row.get("warmup_seconds", 0)
    ax.plot([s["seconds"] / 60 for s in samples], [s["rss_bytes"] / 1e6 for s in samples], marker=".")
    first = next(s for s in samples if s["seconds"] >= warmup)["rss_bytes"] / 1e6
    ax.axvline(warmup / 60, linestyle=":", color="grey", label="end of warm-up")
    ax.axhline(first * 1.05, linestyle="--", color="grey", label="1.05x the first sample after warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("server resident memory, MB")
    ax.set_ylim(0, first * 1.3)
    ax.legend()


DRAW = {"ttft": _ttft, "concurrency": _concurrency, "soak": _soak}


def draw(results: list[dict[str, Any]], folder: Path) -> dict[str, list[Path]]:
    """One PNG per result that a curve or bars say more about than a table; the paths by benchmark."""
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit('bench.report draws with matplotlib: pip install -e ".[bench]"') from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):  # figures of result files that are gone
        stale.unlink()
    out: dict[str, list[Path]] = defaultdict(list)
    for result in results:
        fn = DRAW.get(result["benchmark"])
        if fn is None:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        fn(ax, result)
        where = result["machine"].get("gpu") or result["machine"]["cpu"]
        ax.set_title(f"{result['benchmark']}: {result['model']} on {where.split(',')[0]}", fontsize=10)
        fig.tight_layout()
        path = folder / f"{result['file']}.png"  # named after its result file
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out[result["benchmark"]].append(path)
    return out
