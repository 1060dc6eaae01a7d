"""Planning time of a chat request that resends a 4K-token cached system prompt, as clients do on every
turn: ``python -m bench.planning``. Planning never touches the device: the model's tokenizer and chat
template (default: the real SmolLM2-135M's) render, tokenise and match the cache; no forward pass."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import msgspec

from bench.harness import bench_parser, corpus_text, summary, write_result


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=4000, help="the cached system prompt's length")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    model_name = args.model or "smollm2-135m"
    from adapters.mlx_lm.models import ModelSpec, load_model
    from adapters.mlx_lm.prefix_kv import new_manifest
    from gateway.config import load_config
    from gateway.planning import plan_chat
    from gateway.schemas.openai import ChatCompletionRequest
    from prefix_caches import PrefixCacheStore, kv

    loaded = load_model(ModelSpec(model_name, model_name))
    tok = loaded.tokenizer
    cached = [{"role": "system", "content": tok.decode(tok.encode(corpus_text())[: args.tokens])}]
    tokens = tok.encode(tok.render_chat(cached, add_generation_prompt=False))
    store = PrefixCacheStore(Path(tempfile.mkdtemp()), 1 << 30)
    manifest = new_manifest(loaded, "default", "sys", "messages", tokens, None, cached, None, 64)
    cache = loaded.make_cache()
    loaded.forward(tokens[:8], cache, quantize=False)
    store.save(manifest, kv.exact(cache))  # planning reads the manifest, never the arrays
    model = load_config({"model": model_name}, environ={}).models[0]
    body = {
        "model": model_name,
        "messages": [*cached, {"role": "user", "content": "What is this text about?"}],
        "prefix_cache": "sys",
        "max_tokens": 8,
    }
    req = msgspec.convert(body, ChatCompletionRequest)
    times = []
    planned = None
    for _ in range(args.repeats + 5):
        started = time.perf_counter()
        planned = plan_chat(req, tok, model, loaded.context_length, "default", store)
        times.append(time.perf_counter() - started)
    assert planned is not None and planned.plans[0].prefix is not None, "the request must hit its cache"
    plan = planned.plans[0]
    seconds = times[5:]  # the first ones render the cache's messages and warm the tokenizer
    print(
        f"cache {len(tokens)} tokens; prompt {len(plan.prompt_tokens)} tokens; {plan.prefix.reuse} reused; "
        f"plan_chat median {statistics.median(seconds) * 1000:.2f} ms, min {min(seconds) * 1000:.2f} ms"
    )
    row = {
        "cache_tokens": len(tokens),
        "prompt_tokens": len(plan.prompt_tokens),
        "reused_tokens": plan.prefix.reuse,
        "plan_seconds": summary(seconds),
    }
    write_result("planning", "cpu", model_name, [row], out=args.out)


if __name__ == "__main__":
    main()
