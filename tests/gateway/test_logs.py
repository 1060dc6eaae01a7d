"""The log formatters on records made in-process: the fields of a JSON line, an exception's text, the
request id from the record or from the request being served, and the text format's bracket."""

from __future__ import annotations

import json
import logging
import sys

from gateway.logs import JsonFormatter, RequestIdFilter, TextFormatter
from gateway.request_context import current_request_id, request_id_from


def record(message: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("gateway.test", logging.WARNING, __file__, 1, message, args, None)
    if exc:
        try:
            raise ValueError("broken")
        except ValueError:
            made.exc_info = sys.exc_info()
    made.__dict__.update(extra)
    RequestIdFilter().filter(made)
    return made


def test_json_line_fields_and_exception() -> None:
    line = json.loads(JsonFormatter().format(record("done %d", 3, exc=True)))
    assert set(line) == {"time", "level", "logger", "message", "exception"}
    assert (line["level"], line["logger"], line["message"]) == ("WARNING", "gateway.test", "done 3")
    assert line["exception"].startswith("Traceback") and "ValueError: broken" in line["exception"]


def test_request_id_from_the_record_or_the_request() -> None:
    token = current_request_id.set("req-from-context")
    try:
        assert json.loads(JsonFormatter().format(record("x")))["request_id"] == "req-from-context"
        # The engine thread passes the id of the request a line is about; that one wins.
        assert (
            json.loads(JsonFormatter().format(record("x", request_id="req-explicit")))["request_id"] == "req-explicit"
        )
        assert TextFormatter().format(record("hello")).endswith(" WARNING gateway.test [req-from-context]: hello")
    finally:
        current_request_id.reset(token)
    assert "request_id" not in json.loads(JsonFormatter().format(record("x")))
    assert TextFormatter().format(record("hello")).endswith(" WARNING gateway.test: hello")


def test_request_ids_are_bounded() -> None:
    assert request_id_from("abc-1.2:3_X") == "abc-1.2:3_X"
    assert request_id_from("a" * 128) == "a" * 128
    for bad in (None, "", "a" * 129, "new\nline", 'quote"', "ünï"):
        assert request_id_from(bad).startswith("req_") and len(request_id_from(bad)) == 36
