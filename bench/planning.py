"""Planning time of a chat request that resends a 4K-token cached system prompt, as clients do on every
turn: ``python -m bench.planning``. CPU only (planning never touches the device); the real SmolLM2-135M
tokenizer and chat template; rendering, tokenising and matching the cache are timed, no forward pass."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import msgspec


def main() -> None:
    from adapters.mlx_lm.blas import load_optimised_blas

    load_optimised_blas()
    from adapters.mlx_lm.models import ModelSpec, load_model
    from adapters.mlx_lm.prefix_kv import new_manifest
    from gateway.config import load_config
    from gateway.planning import plan_chat
    from gateway.schemas.openai import ChatCompletionRequest
    from prefix_caches import PrefixCacheStore, kv

    loaded = load_model(ModelSpec("smollm2-135m", "smollm2-135m"))
    tok = loaded.tokenizer
    prose = Path(__file__).resolve().parent.parent.joinpath("tests", "data", "prose.txt").read_text()
    system = tok.decode(tok.encode((prose + " ") * 20)[:4000])
    cached = [{"role": "system", "content": system}]
    tokens = tok.encode(tok.render_chat(cached, add_generation_prompt=False))
    store = PrefixCacheStore(Path(tempfile.mkdtemp()), 1 << 30)
    manifest = new_manifest(loaded, "default", "sys", "messages", tokens, None, cached, None, 64)
    cache = loaded.make_cache()
    loaded.forward(tokens[:8], cache, quantize=False)
    store.save(manifest, kv.exact(cache))  # planning reads the manifest, never the arrays
    model = load_config({"model": "smollm2-135m"}, environ={}).models[0]
    body = {
        "model": "smollm2-135m",
        "messages": [*cached, {"role": "user", "content": "What is this text about?"}],
        "prefix_cache": "sys",
        "max_tokens": 8,
    }
    req = msgspec.convert(body, ChatCompletionRequest)
    times = []
    planned = None
    for _ in range(35):
        started = time.perf_counter()
        planned = plan_chat(req, tok, model, 8192, "default", store)
        times.append((time.perf_counter() - started) * 1000)
    assert planned is not None
    plan = planned.plans[0]
    reuse = plan.prefix.reuse if plan.prefix else 0
    print(f"cache {len(tokens)} tokens; prompt {len(plan.prompt_tokens)} tokens; {reuse} reused")
    print(f"plan_chat: median {statistics.median(times[5:]):.2f} ms, min {min(times[5:]):.2f} ms (30 runs after 5)")


if __name__ == "__main__":
    main()
