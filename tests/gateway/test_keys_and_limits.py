"""Key forms (plaintext and ``sha256:<hex>``), tenant limits in the config, and the per-minute windows."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, TenantLimits, load_config
from gateway.errors import TenantRateLimited
from gateway.tenancy.auth import _tenant_of  # pyright: ignore[reportPrivateUsage]
from gateway.tenancy.keys import entry_digest, hashed_form, is_hashed, new_key
from gateway.tenancy.rate_limits import Rates, duration


def test_hashed_keys_match_their_key_never_the_digest_itself() -> None:
    key = new_key()
    assert key.startswith("mgw-") and len(key) > 40 and new_key() != key
    stored = hashed_form(key)
    assert is_hashed(stored) and not is_hashed(key) and not is_hashed("sha256:" + "0" * 63)
    keys = {stored: "alpha", "plain-key": "beta"}
    assert _tenant_of(key, keys) == "alpha" and _tenant_of("plain-key", keys) == "beta"
    assert _tenant_of(stored, keys) is None  # the leaked digest is no key
    assert _tenant_of(stored.removeprefix("sha256:"), keys) is None
    assert entry_digest(stored) == entry_digest(key)


def test_config_reads_hashed_keys_from_file_env_and_flags(tmp_path: Path) -> None:
    digest = hashed_form("k1")
    f = tmp_path / "c.toml"
    f.write_text(f'api_keys = {{ "{digest}" = "alpha", "k2" = "beta" }}\nadmin_key = "{hashed_form("adm")}"\n')
    assert load_config({"config": str(f)}, environ={}).api_keys == {digest: "alpha", "k2": "beta"}
    env = {"MLX_GATEWAY_API_KEYS": f"{digest}:alpha,k2"}
    assert load_config({}, environ=env).api_keys == {digest: "alpha", "k2": "default"}
    assert load_config({"api_keys": [f"{digest}:t"]}, environ={}).api_keys == {digest: "t"}


@pytest.mark.parametrize("entry", ["sha256:abc", "sha256:" + "A" * 64, "sha256:" + "0" * 65])
def test_a_malformed_digest_is_refused_not_taken_as_a_plaintext_key(entry: str) -> None:
    with pytest.raises(ConfigError, match="SHA-256"):
        load_config({"api_keys": [f"{entry}:t"]}, environ={})


def test_tenant_limits_take_their_own_values_over_the_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        "[tenant_defaults]\nmax_concurrent_requests = 4\nmax_prefix_cache_disk_bytes = '2GiB'\n"
        "[tenants.alpha]\nmax_concurrent_requests = 1\nmax_prefix_cache_memory_bytes = '512MiB'\n"
    )
    c = load_config({"config": str(f)}, environ={})
    assert c.limits("alpha") == TenantLimits(
        max_concurrent_requests=1, max_prefix_cache_disk_bytes=2 * 1024**3, max_prefix_cache_memory_bytes=512 * 1024**2
    )
    assert c.limits("anyone") == TenantLimits(max_concurrent_requests=4, max_prefix_cache_disk_bytes=2 * 1024**3)
    f.write_text("[tenants.alpha]\nmax_concurent_requests = 1\n")  # a typo is an error, not unlimited
    with pytest.raises(ConfigError):
        load_config({"config": str(f)}, environ={})


def test_durations_are_written_as_openai_writes_them() -> None:
    assert [duration(s) for s in (0, 0.02, 1, 59.6, 360, 61)] == ["0ms", "20ms", "1s", "1m0s", "6m0s", "1m1s"]


def test_token_window_reserves_settles_and_slides() -> None:
    now = [1000.0]
    rates = Rates(lambda _: TenantLimits(tokens_per_minute=100, requests_per_minute=3), clock=lambda: now[0])
    first = rates.reserve("a", 80)  # prompt + max_tokens
    with pytest.raises(TenantRateLimited) as refused:
        rates.reserve("a", 30)
    assert refused.value.type == "tokens" and refused.value.headers()["retry-after"] == "60"
    rates.settle(first, 25)  # it used 25 in the end
    rates.reserve("a", 30)
    assert rates.headers("a") == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "45",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    rates.reserve("b", 100)  # another tenant: its own windows
    now[0] += 30
    rates.reserve("a", 1)
    with pytest.raises(TenantRateLimited) as refused:
        rates.reserve("a", 1)
    assert refused.value.type == "requests" and refused.value.retry_after == pytest.approx(30)
    assert refused.value.headers()["x-should-retry"] == "true"
    with pytest.raises(TenantRateLimited, match="lower max_tokens"):
        rates.reserve("c", 101)  # never fits
    now[0] += 30.5  # the first two left the window
    assert rates.headers("a")["x-ratelimit-remaining-tokens"] == "99"
    assert rates.headers("a")["x-ratelimit-reset-tokens"] == "30s"
    assert Rates(lambda _: TenantLimits()).headers("a") == {}
