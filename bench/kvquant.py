"""KV quantisation of a prefix cache: bytes, greedy agreement with the unquantised cache, hit TTFT.

    python -m bench.kvquant --device cpu [--prompts 50 --tokens 64]

A 2K-token system prompt is cached three times (full precision, q8, q4; group size 64); each of
``--prompts`` questions is answered greedily from each cache. "Agreement" is the share of prompts whose
whole greedy output equals the full-precision one. The bytes are KV only (weights are not quantised).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import DEFAULT_MODEL, Texts, bench_parser, gateway, summary, write_result

NO_EOS = {"0": -100, "2": -100}


def answer(url: str, model: str, cache: str, question: str, tokens: int) -> tuple[str, float]:
    start = time.perf_counter()
    r = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=600,
        json={
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": tokens,
            "temperature": 0,
            "prefix_cache": cache,
            "logit_bias": NO_EOS,
        },
    )
    if r.status_code != 200:
        raise RuntimeError(f"{cache}: HTTP {r.status_code}: {r.text}")
    return r.json()["choices"][0]["message"]["content"], time.perf_counter() - start


def ttft(url: str, model: str, cache: str, question: str) -> float:
    return answer(url, model, cache, question, 1)[1]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    texts = Texts(model)
    system = texts.text(2048)
    questions = [texts.text(24, offset=20000 + 29 * i) + "?" for i in range(args.prompts)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, gateway(model, Path(tmp) / "c", Path(tmp) / "log") as gw:
        outputs: dict[str, list[str]] = {}
        for name, bits in (("full", None), ("q8", 8), ("q4", 4)):
            body: dict[str, Any] = {"name": name, "model": model, "messages": [{"role": "system", "content": system}]}
            if bits:
                body |= {"kv_bits": bits, "kv_group_size": args.group_size}
            info = httpx.post(f"{gw.url}/admin/prefix-caches", json=body, timeout=3600)
            info.raise_for_status()
            outputs[name] = [answer(gw.url, model, name, q, args.tokens)[0] for q in questions]
            hits = [ttft(gw.url, model, name, questions[i % len(questions)]) for i in range(6)][1:]
            rows.append(
                {"cache": name, "kv_bits": bits, "bytes_on_disk": info.json()["size_bytes"], "hit_ttft": summary(hits)}
            )
            print(name, info.json()["size_bytes"], f"{summary(hits)['median'] * 1e3:.1f} ms", flush=True)
    full_bytes, full_ttft = rows[0]["bytes_on_disk"], rows[0]["hit_ttft"]["median"]
    for row in rows:
        same = sum(a == b for a, b in zip(outputs["full"], outputs[row["cache"]], strict=True))
        row["agreement"] = same / len(questions)
        row["bytes_ratio"] = row["bytes_on_disk"] / full_bytes
        row["ttft_ratio"] = row["hit_ttft"]["median"] / full_ttft
        print(
            f"{row['cache']}: {row['bytes_ratio']:.2f}x bytes, agreement {row['agreement']:.0%}, "
            f"hit TTFT {row['ttft_ratio']:.2f}x",
            flush=True,
        )
    notes = (
        f"2K-token system prompt, {args.prompts} questions, {args.tokens} greedy tokens, group size "
        f"{args.group_size}. Bytes are the KV files (KV only: weights are not quantised)."
    )
    write_result("kvquant", args.device, model, rows, notes=notes, out=args.out)


if __name__ == "__main__":
    main()
