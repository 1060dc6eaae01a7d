"""Single-stream decode against the memory-bandwidth limit.

Decoding one token reads every weight once, so weights' bytes x tokens/s is the bandwidth decode
uses; the limit is what the device moves in a plain copy (read + write of a 2 GiB array on the device),
measured in the same run. Decode is measured in process (mlx-lm's ``stream_generate`` on the gateway's
loaded model) and through the gateway (HTTP, streamed).

    python -m bench.bandwidth --device gpu --model llama-8b
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import DEFAULT_MODEL, Texts, bench_parser, gateway, summary, write_result
from bench.overhead import over_http


def copy_bandwidth(nbytes: int, repeats: int) -> dict[str, float]:
    """Bytes moved per second (read + write) by an elementwise copy on the default device."""
    import mlx.core as mx

    a = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(a)
    rates = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        b = a * -1.0
        mx.eval(b)
        seconds = time.perf_counter() - start
        del b
        if i:
            rates.append(2 * a.nbytes / seconds)
    return summary(rates)


def weights(model: str) -> tuple[int, int]:
    """(all weight bytes, bytes one decode step reads: all but the input embedding when it is untied)."""
    from mlx.utils import tree_flatten

    from adapters.mlx_lm.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(model, model))
    params = dict(tree_flatten(loaded.model.parameters()))
    total = sum(v.nbytes for v in params.values())
    tied = not any(k.endswith("lm_head.weight") for k in params)
    embed = sum(v.nbytes for k, v in params.items() if k.endswith("embed_tokens.weight"))
    return total, total if tied else total - embed  # a token reads one row of an untied embedding


def in_process(model: str, prompt: list[int], max_tokens: int, repeats: int) -> dict[str, Any]:
    from mlx_lm import stream_generate

    from adapters.mlx_lm.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(model, model))
    rates = []
    for i in range(repeats + 1):
        responses = list(stream_generate(loaded.model, loaded.tokenizer.wrapper, prompt, max_tokens=max_tokens))
        if i:
            rates.append(responses[-1].generation_tps)
    return summary(rates)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copy-bytes", type=int, default=2 * 1024**3)
    parser.add_argument("--quick", action="store_true", help="64 tokens, 1 repeat, a 512 MiB copy")
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    max_tokens, repeats, copy_bytes = args.max_tokens, args.repeats, args.copy_bytes
    if args.quick:
        max_tokens, repeats, copy_bytes = 64, 1, 512 * 1024**2
    texts = Texts(model)
    prompt = texts.ids[:128]
    total, per_token = weights(model)
    copy = copy_bandwidth(copy_bytes, 5)
    rows: list[dict[str, Any]] = []
    local = in_process(model, prompt, max_tokens, repeats)
    rows.append({"path": "in-process stream_generate", "tokens_per_s": local})
    with tempfile.TemporaryDirectory() as tmp, gateway(model, Path(tmp) / "c", Path(tmp) / "server.log") as gw:
        http = over_http(gw.url, model, prompt, max_tokens, "balanced", repeats)
    rows.append({"path": "HTTP, balanced", "tokens_per_s": http["decode_tokens_per_s"]})
    for row in rows:
        tps = row["tokens_per_s"]["median"]
        row["weight_bytes"] = total
        row["bytes_read_per_token"] = per_token
        row["decode_bytes_per_s"] = per_token * tps
        row["copy_bytes_per_s"] = copy["median"]
        row["fraction_of_copy_bandwidth"] = per_token * tps / copy["median"]
        print(
            f"{row['path']}: {tps:.1f} tok/s x {per_token / 1e9:.2f} GB = {per_token * tps / 1e9:.0f} GB/s "
            f"of {copy['median'] / 1e9:.0f} GB/s copy ({row['fraction_of_copy_bandwidth']:.0%})",
            flush=True,
        )
    write_result(
        "bandwidth",
        args.device,
        model,
        rows,
        out=args.out,
        notes=f"128-token prompt, {max_tokens} tokens, greedy, medians of {repeats}; copy: {copy_bytes} bytes, "
        "read + write counted.",
    )


if __name__ == "__main__":
    main()
