"""Logging, configured once: text or JSON lines on stderr, each carrying the request id when it has one.

The id comes from the record (``extra={"request_id": ...}``: the engine thread logs that way) or else from
the HTTP request being served (:data:`gateway.request_context.current_request_id`), so uvicorn's access
log and the gateway's own lines of one request carry the same id.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

import msgspec

from gateway.request_context import current_request_id

__all__ = ["JsonFormatter", "RequestIdFilter", "TextFormatter", "setup_logging"]

_encoder = msgspec.json.Encoder()


class RequestIdFilter(logging.Filter):
    """Gives every record a ``request_id`` attribute: its own, the current request's, or None."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id]: message`` (the bracket only within a request); with an ``origin``
    (one of several API servers), ``time LEVEL logger (origin, pid N) [request id]: message``."""

    def __init__(self, origin: str | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(origin)s%(rid)s: %(message)s")
        self.origin = origin

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        record.origin = f" ({self.origin}, pid {record.process})" if self.origin else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, and when
    present ``origin`` and ``pid`` (one of several API servers), ``request_id``, ``exception`` (the traceback's
    text) and, on uvicorn's access lines, ``client``, ``method``, ``path``, ``http_version``, ``status``."""

    def __init__(self, origin: str | None = None) -> None:
        super().__init__()
        self.origin = origin

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.origin:
            out.update(origin=self.origin, pid=record.process)
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, version, status = record.args
            out.update(client=client, method=method, path=path, http_version=version, status=status)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return _encoder.encode(out).decode()


def setup_logging(level: str, fmt: Literal["text", "json"] = "text", origin: str | None = None) -> None:
    """Send every logger's records (uvicorn's included) to stderr in ``fmt``, at ``level`` and above; with
    ``origin`` (which of several API servers this process is), each line names it and this process's pid.

    Replaces the root logger's handlers, so calling it again (tests, a second app) does not double lines.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(origin) if fmt == "json" else TextFormatter(origin))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # a library's warning becomes a line in the same format, not raw stderr
    # uvicorn's loggers propagate to the root when it is given log_config=None (gateway/processes/server.py);
    # handlers of their own would print a line twice, in another format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
