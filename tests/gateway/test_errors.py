"""The one error table: what each error a client can meet is answered with (status, type, code, param,
message, headers), raised or as an engine's ``Failed`` event."""

from __future__ import annotations

import pytest

from adapters.base import EngineError, EngineNotReady, ModelUnavailable, PrefixBuildRefused, StorageFull, UnknownModel
from gateway.errors import (
    APIError,
    BuildFailed,
    EngineFailed,
    ServerError,
    api_error,
    failure,
    logged,
)
from prefix_caches.errors import (
    InvalidCacheName,
    InvalidKVSettings,
    PrefixCacheExists,
    PrefixCacheNotFound,
    PrefixCacheQuotaExceeded,
    PrefixCacheStorageFull,
    PrefixCacheUnusable,
)

NO_RETRY = {"x-should-retry": "false"}


def _answer(error: APIError) -> tuple[int, str, str | None, str | None, str, dict[str, str]]:
    return error.status_code, error.type, error.code, error.param, error.message, error.headers()


@pytest.mark.parametrize(
    ("raised", "answer"),
    [
        (
            UnknownModel("m"),
            (404, "invalid_request_error", "model_not_found", "model", "The model 'm' does not exist", NO_RETRY),
        ),
        (EngineNotReady("loading"), (503, "server_error", "model_loading", "model", "loading", {"retry-after": "5"})),
        (ModelUnavailable("failed"), (503, "server_error", "model_unavailable", "model", "failed", NO_RETRY)),
        (EngineError("boom"), (500, "server_error", None, None, "boom", {})),
        (
            StorageFull("disk"),
            (507, "server_error", "insufficient_storage", None, "The prefix cache could not be saved: disk", NO_RETRY),
        ),
        (
            PrefixCacheNotFound("c"),
            (
                404,
                "invalid_request_error",
                "prefix_cache_not_found",
                "prefix_cache",
                "The prefix cache 'c' does not exist",
                NO_RETRY,
            ),
        ),
        (
            PrefixCacheExists("c"),
            (409, "invalid_request_error", "prefix_cache_exists", "name", str(PrefixCacheExists("c")), NO_RETRY),
        ),
        (
            PrefixCacheQuotaExceeded("prefix_cache_count_quota", "too many"),
            (403, "insufficient_quota", "prefix_cache_count_quota", None, "too many", NO_RETRY),
        ),
        (
            InvalidKVSettings("bits"),
            (400, "invalid_request_error", "invalid_kv_settings", "kv_group_size", "bits", NO_RETRY),
        ),
        (InvalidCacheName("bad"), (400, "invalid_request_error", "invalid_prefix_cache_name", "name", "bad", NO_RETRY)),
        (
            PrefixCacheUnusable("corrupt"),
            (400, "invalid_request_error", "prefix_cache_unusable", "prefix_cache", "corrupt", NO_RETRY),
        ),
        (
            PrefixCacheStorageFull("full"),
            (400, "invalid_request_error", "prefix_cache_unusable", "prefix_cache", "full", NO_RETRY),
        ),
    ],
)
def test_each_engine_and_store_error_has_one_answer(raised: Exception, answer: tuple[object, ...]) -> None:
    error = api_error(raised)
    assert error is not None and _answer(error) == answer


def test_ours_are_answered_as_they_are_and_undeclared_ones_not_at_all() -> None:
    ours = ServerError("x")
    assert api_error(ours) is ours
    assert api_error(ValueError("a bug")) is None
    assert logged(EngineError("x")) and not logged(UnknownModel("m")) and not logged(ValueError("a bug"))


def test_a_refused_build_is_answered_as_its_refusal() -> None:
    refusal = PrefixCacheQuotaExceeded("prefix_cache_disk_quota", "over the disk quota")
    for error in (api_error(PrefixBuildRefused(refusal)), failure(PrefixBuildRefused(refusal), BuildFailed)):
        assert error is not None
        assert _answer(error) == (
            403,
            "insufficient_quota",
            "prefix_cache_disk_quota",
            None,
            "over the disk quota",
            NO_RETRY,
        )


def test_a_failed_build_keeps_a_full_disk_and_names_the_build_otherwise() -> None:
    assert failure(StorageFull("disk"), BuildFailed).status_code == 507
    for cause in (EngineError("boom"), ModelUnavailable("The engine stopped")):
        error = failure(cause, BuildFailed)
        assert _answer(error) == (500, "server_error", None, None, f"Building the prefix cache failed: {cause}", {})


def test_a_failed_request_is_a_500_whatever_its_cause() -> None:
    for cause in (EngineError("The server is stopping"), ModelUnavailable("The engine stopped: gone")):
        error = failure(cause, EngineFailed)
        assert _answer(error) == (500, "server_error", None, None, f"The engine failed on this request: {cause}", {})
