"""Every error the API returns, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, and the
one table that says which HTTP status, ``type`` and ``code`` each error a client can meet is answered with.

Our own errors carry theirs as class attributes (:class:`APIError` and its subclasses, all declared here). The
engine's errors (``adapters.base``) and the prefix-cache store's (``prefix_caches.errors``) are declared in
:data:`FOREIGN_ERRORS`, as the one of ours each becomes: those packages never import the gateway, so their
classes cannot carry HTTP facts themselves. :func:`api_error` applies the table to a raised error;
:func:`failure` to the error of an engine's ``Failed`` event. The app's one exception handler
(``gateway.app``) and the SSE stream's last event (``gateway.sse``) both use :func:`api_error`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec

from adapters.base import (
    AdapterExists,
    AdapterRefused,
    EngineError,
    EngineNotReady,
    ModelUnavailable,
    PrefixBuildRefused,
    StorageFull,
    UnknownModel,
)
from prefix_caches.errors import (
    InvalidCacheName,
    InvalidKVSettings,
    PrefixCacheError,
    PrefixCacheExists,
    PrefixCacheNotFound,
    PrefixCacheQuotaExceeded,
)

__all__ = [
    "FOREIGN_ERRORS",
    "APIError",
    "AuthenticationError",
    "BuildFailed",
    "ClientLeft",
    "Conflict",
    "ContextLengthExceeded",
    "EngineFailed",
    "ErrorBody",
    "ErrorResponse",
    "Forbidden",
    "InsufficientStorage",
    "InvalidRequest",
    "Maps",
    "MethodNotAllowed",
    "ModelUnavailableError",
    "NotFound",
    "PayloadTooLarge",
    "QuotaExceeded",
    "RateLimited",
    "ServerError",
    "ServiceUnavailable",
    "TenantRateLimited",
    "api_error",
    "failure",
    "logged",
]


class ErrorBody(msgspec.Struct, kw_only=True):
    """What went wrong: ``param`` names the offending request field (or null), ``code`` is a stable
    machine-readable reason (or null)."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """Every error this server returns, as OpenAI shapes it."""

    error: ErrorBody


class APIError(Exception):
    status_code: int = 500
    type: str = "server_error"
    code: str | None = None
    # Whether the openai SDK may retry: it retries 408/409/429/5xx unless told otherwise.
    retryable: bool = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))

    def headers(self) -> dict[str, str]:
        return {} if self.retryable else {"x-should-retry": "false"}


class InvalidRequest(APIError):
    status_code = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationError(APIError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(APIError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


class QuotaExceeded(APIError):
    """A tenant's storage quota (prefix caches): a 403, not a 429, as retrying never helps (the openai SDK
    retries every 429); ``code`` names the quota."""

    status_code = 403
    type = "insufficient_quota"


class NotFound(APIError):
    status_code = 404
    type = "invalid_request_error"


class MethodNotAllowed(APIError):
    status_code = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        # RFC 9110: a 405 must say which methods the resource has.
        return {**super().headers(), "allow": self.allow}


class Conflict(APIError):
    status_code = 409
    type = "invalid_request_error"


class PayloadTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ServerError(APIError):
    status_code = 500
    type = "server_error"
    retryable = True


class ServiceUnavailable(APIError):
    """Try again shortly (a model loading, the server draining toward another replica)."""

    status_code = 503
    type = "server_error"
    code = "service_unavailable"
    retryable = True

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after: int = 5
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "retry-after": str(self.retry_after)}


class ModelUnavailableError(APIError):
    """The model cannot serve until the server is fixed and restarted: clients must not retry."""

    status_code = 503
    type = "server_error"
    code = "model_unavailable"


class InsufficientStorage(APIError):
    """The disk under the prefix caches is full (RFC 4918's 507). Retrying at once will not help."""

    status_code = 507
    type = "server_error"
    code = "insufficient_storage"


class RateLimited(APIError):
    """The server's own limits (running and queued requests, queued prompt tokens, the queue timeout)."""

    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retryable = True

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(max(1, round(self.retry_after)))}


class TenantRateLimited(APIError):
    """A tenant past one of its own limits; ``type`` is ``requests`` or ``tokens``, as OpenAI's are."""

    status_code = 429
    code = "rate_limit_exceeded"
    retryable = True

    def __init__(self, message: str, kind: str, retry_after: float) -> None:
        super().__init__(message)
        self.type = kind
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(max(1, round(self.retry_after + 0.499))), "x-should-retry": "true"}


class ClientLeft(APIError):
    """The client closed its connection before its answer. Nobody reads this response (the ASGI server drops
    what is sent on a closed connection); its status, nginx's 499, is what the request metrics count."""

    status_code = 499
    type = "client_closed_request"
    code = "client_closed_request"


class EngineFailed(ServerError):
    """A running request's ``Failed`` event. Whatever its cause (the engine stopping, a bug in a step), the
    request was valid and was admitted: a 500 the SDK may retry, as clients have always been answered."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"The engine failed on this request: {cause}")


class BuildFailed(ServerError):
    """A prefix-cache build's ``Failed`` event that :data:`FOREIGN_ERRORS` does not answer otherwise."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"Building the prefix cache failed: {cause}")


@dataclass(frozen=True)
class Maps:
    """How one foreign error class reaches a client: as ``error`` (its status, type and retry headers).

    Attributes:
        error: the class of ours it is answered as (with ``via``: as the wrapped error is, or else this).
        param: the request field it names.
        code: its ``code`` (None: ``error``'s own).
        code_from: the error's attribute that holds its code instead (a quota's name).
        message: the message, ``{}`` being the error's own text.
        via: the error's attribute holding the error to answer with instead (a wrapped refusal).
        failed_too: also when it comes as a build's ``Failed`` event (it says what the client must fix or
            expect: a full disk, a quota); any other failure is a 500 naming the work that failed.
        logged: written to the log at ERROR (a server-side failure an operator should see).
    """

    error: type[APIError]
    param: str | None = None
    code: str | None = None
    code_from: str | None = None
    message: str = "{}"
    via: str | None = None
    failed_too: bool = False
    logged: bool = False


# The engine's and the store's errors, by class; the most derived entry of an error's class wins.
FOREIGN_ERRORS: Mapping[type[Exception], Maps] = {
    UnknownModel: Maps(NotFound, param="model", code="model_not_found"),
    EngineNotReady: Maps(ServiceUnavailable, param="model", code="model_loading"),
    AdapterRefused: Maps(InvalidRequest, param="path", code="invalid_adapter"),
    AdapterExists: Maps(Conflict, param="name", code="adapter_exists"),
    ModelUnavailable: Maps(ModelUnavailableError, param="model"),
    StorageFull: Maps(InsufficientStorage, message="The prefix cache could not be saved: {}", failed_too=True),
    PrefixBuildRefused: Maps(ServerError, via="refusal", failed_too=True),
    EngineError: Maps(ServerError, logged=True),
    PrefixCacheNotFound: Maps(NotFound, param="prefix_cache", code="prefix_cache_not_found"),
    PrefixCacheExists: Maps(Conflict, param="name", code="prefix_cache_exists"),
    PrefixCacheQuotaExceeded: Maps(QuotaExceeded, code_from="quota"),
    InvalidKVSettings: Maps(InvalidRequest, param="kv_group_size", code="invalid_kv_settings"),
    InvalidCacheName: Maps(InvalidRequest, param="name", code="invalid_prefix_cache_name"),
    # Anything else the store raises: a stored file is corrupt or was written for another model or version.
    PrefixCacheError: Maps(InvalidRequest, param="prefix_cache", code="prefix_cache_unusable"),
}


def _entry(error: BaseException) -> Maps | None:
    for cls in type(error).__mro__:
        entry = FOREIGN_ERRORS.get(cls)
        if entry is not None:
            return entry
    return None


def _apply(entry: Maps, error: BaseException) -> APIError:
    if entry.via is not None:
        return api_error(getattr(error, entry.via)) or entry.error(str(error))
    code = getattr(error, entry.code_from) if entry.code_from is not None else entry.code
    return entry.error(entry.message.format(error), param=entry.param, code=code)


def api_error(error: BaseException) -> APIError | None:
    """``error`` as a client is answered: itself when it is ours, else as :data:`FOREIGN_ERRORS` declares.

    Returns:
        None for an error nobody declared (a bug: the caller answers a 500 and logs its traceback).
    """
    if isinstance(error, APIError):
        return error
    entry = _entry(error)
    return None if entry is None else _apply(entry, error)


def logged(error: BaseException) -> bool:
    """Whether the table asks for ``error`` to be logged at ERROR (a server-side failure)."""
    entry = _entry(error)
    return entry is not None and entry.logged


def failure(error: Exception, otherwise: Callable[[Exception], APIError]) -> APIError:
    """The error of an engine's ``Failed`` event as a client is answered.

    Args:
        error: what the event carries.
        otherwise: the 500 naming the work that failed (:class:`EngineFailed`, :class:`BuildFailed`), for
            every error the table does not mark ``failed_too``.
    """
    entry = _entry(error)
    if entry is not None and entry.failed_too:
        return _apply(entry, error)
    return otherwise(error)
