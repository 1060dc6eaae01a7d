"""Every error the API returns, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

One base class carries the status and the fields; the app's handler table (``gateway.app``) turns these,
Litestar's own HTTP errors and anything unexpected into responses.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "APIError",
    "AuthenticationError",
    "Conflict",
    "ContextLengthExceeded",
    "ErrorBody",
    "ErrorResponse",
    "Forbidden",
    "InsufficientStorage",
    "InvalidRequest",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "QuotaExceeded",
    "ServerError",
    "ServiceUnavailable",
    "ModelUnavailableError",
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
