"""Request bodies: JSON bytes decoded strictly, straight into the handler's Struct, by msgspec.

Litestar decodes a JSON body into Python objects, then converts them to the handler's type with
``msgspec.convert(..., strict=False)``: the lax mode meant for query strings and form fields, in which
``"max_tokens": "5"`` passes as ``5`` and ``"stream": "true"`` as ``True``. OpenAI's API is strict, and so are
we: :class:`StrictBody`, the app's data DTO (Litestar's extension point for how body bytes become a handler's
``data``), decodes the bytes with a typed ``msgspec.json.Decoder`` instead. Constraints in the Structs
(``msgspec.Meta``) are checked in the same pass, and failures become OpenAI-shaped 400s naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import msgspec
from litestar.dto import AbstractDTO, DTOConfig, DTOFieldDefinition
from litestar.typing import FieldDefinition

from gateway.errors import InvalidRequest
from gateway.schemas.openai import CACHE_NAME_PATTERN, CACHE_NAME_RULE

if TYPE_CHECKING:
    from litestar.openapi.spec import Reference, Schema

    from adapters.upstream import DTOBackend, SchemaCreator

__all__ = ["StrictBody", "cache_name_error", "invalid_body"]

T = TypeVar("T")

# msgspec: "<rule> - at `$.messages[0].role`", or for a mapping's key "<rule> - at `key` in `$.logit_bias`".
_AT = re.compile(r"^(?P<message>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD = re.compile(r"^Object (?P<what>missing required|contains unknown) field `(?P<field>[^`]+)`$")


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


_CACHE_NAME_BROKEN = f"Expected `str` matching regex {CACHE_NAME_PATTERN!r}"


def cache_name_error(param: str, message: str) -> InvalidRequest | None:
    """A prefix-cache name that breaks the name rule, with the store's code and the rule in words."""
    if message != _CACHE_NAME_BROKEN:
        return None
    return InvalidRequest(
        f"Invalid prefix cache name for '{param}': use {CACHE_NAME_RULE}", param=param, code="invalid_prefix_cache_name"
    )


def invalid_body(exc: msgspec.ValidationError) -> InvalidRequest:
    """An OpenAI-shaped 400 for a body that does not fit its Struct: the message names the field and the
    rule, ``param`` is the field's path (``messages[0].role``)."""
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any text
    message, path = match["message"], (match["path"] or "").lstrip(".")
    if match["key"]:
        message = f"a key: {message}"
    if field := _FIELD.match(message):
        param = _join(path, field["field"])
        if field["what"] == "missing required":
            return InvalidRequest(f"Missing required parameter '{param}'", param=param)
        return InvalidRequest(f"Unrecognized request argument supplied: '{param}'", param=param)
    if not path:
        if message.startswith("Expected `object`"):
            got = message.rpartition("got ")[2]
            return InvalidRequest(f"The request body must be a JSON object, got {got}")
        return InvalidRequest(f"Invalid request body: {message}")
    return cache_name_error(path, message) or InvalidRequest(f"Invalid value for '{path}': {message}", param=path)


def _too_deep() -> InvalidRequest:
    """A body nested deeper than the decoder goes: msgspec stops near Python's recursion limit (about a
    thousand levels of objects and arrays, less the stack in use) with a RecursionError."""
    return InvalidRequest("The request body nests JSON objects and arrays too deeply for this server to decode")


class StrictBody(AbstractDTO[T]):
    """Decodes a handler's ``data`` from the body's bytes with msgspec, strictly (see the module's docstring).

    Registered for the whole app (``Litestar(dto=StrictBody, return_dto=None)``); it keeps one decoder per
    route handler and documents the body with the handler's own type.
    """

    config: ClassVar[DTOConfig] = DTOConfig()
    _decoders: ClassVar[dict[str, msgspec.json.Decoder[Any]]] = {}
    _types: ClassVar[dict[str, Any]] = {}

    @classmethod
    def create_for_field_definition(
        cls, field_definition: FieldDefinition, handler_id: str, backend_cls: type[DTOBackend] | None = None
    ) -> None:
        cls._types[handler_id] = field_definition.annotation
        cls._decoders[handler_id] = msgspec.json.Decoder(field_definition.annotation)

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: SchemaCreator
    ) -> Reference | Schema:
        return schema_creator.for_field_definition(FieldDefinition.from_annotation(cls._types[handler_id]))

    def decode_bytes(self, value: bytes) -> Any:
        decoder = self._decoders[self.asgi_connection.route_handler.handler_id]
        try:
            return decoder.decode(value)
        except msgspec.ValidationError as exc:
            raise invalid_body(exc) from None
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise _too_deep() from None

    def decode_builtins(self, value: dict[str, Any]) -> Any:
        try:
            return msgspec.convert(value, self._types[self.asgi_connection.route_handler.handler_id])
        except msgspec.ValidationError as exc:
            raise invalid_body(exc) from None
        except RecursionError:
            raise _too_deep() from None

    @classmethod
    def generate_field_definitions(cls, model_type: type[Any]) -> Generator[DTOFieldDefinition, None, None]:
        yield from ()  # no transfer model: the body decodes straight into the handler's type

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False
