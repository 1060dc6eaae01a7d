"""A server with named prefix caches switched off (``prefix_caches = false``): requests that name one,
and the admin routes, get a clear OpenAI-shaped 400; plain requests are served as usual."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.servers import run_server


def test_naming_a_cache_with_caching_off_is_a_400(models_dir: Path, log_dir: Path) -> None:
    env = {"MLX_GATEWAY_PREFIX_CACHES": "false"}
    with run_server(["--model", "tiny"], models_dir=models_dir, log_dir=log_dir, env=env) as server:
        base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        ok = httpx.post(f"{server.url}/v1/chat/completions", json=base, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        named = httpx.post(f"{server.url}/v1/chat/completions", json={**base, "prefix_cache": "sys"}, timeout=60)
        assert named.status_code == 400, named.text
        error = named.json()["error"]
        assert error["param"] == "prefix_cache" and "not enabled" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        build = httpx.post(f"{server.url}/admin/prefix-caches", json={"name": "sys", "model": "tiny", "prompt": "x"})
        assert build.status_code == 400 and "not enabled" in build.json()["error"]["message"], build.text
        streamed = {"name": "sys", "model": "tiny", "prompt": "x", "stream": True}
        build = httpx.post(f"{server.url}/admin/prefix-caches", json=streamed)
        assert build.status_code == 400 and "not enabled" in build.json()["error"]["message"], build.text
        warm = httpx.post(f"{server.url}/admin/prefix-caches/sys/warm")
        assert warm.status_code == 400 and "not enabled" in warm.json()["error"]["message"], warm.text
        assert httpx.get(f"{server.url}/health").json()["prefix_caches"] is None
        # /metrics has no prefix-cache family then, and still everything else.
        scraped = httpx.get(f"{server.url}/metrics").text
        assert "mlx_gateway_prefix_cache" not in scraped
        assert 'mlx_gateway_engine_requests_total{model="tiny",outcome="completed"} 1.0' in scraped
