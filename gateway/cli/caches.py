"""``mlx-gateway caches``: named prefix caches, managed over a running gateway's admin API."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, TextIO, TypeVar

import click
import msgspec

from gateway.cli.admin_client import AdminClient, AdminError
from gateway.schemas.admin import PrefixCacheOut

__all__ = ["caches"]

F = TypeVar("F", bound=Callable[..., Any])


def _connection(command: F) -> F:
    """The options every ``caches`` command takes: where the gateway is, the key, the tenant, the output."""
    options = [
        click.option(
            "--url",
            envvar="MLX_GATEWAY_URL",
            default="http://127.0.0.1:8000",
            show_default=True,
            show_envvar=True,
            help="The gateway's base URL.",
        ),
        click.option(
            "--key",
            envvar=["MLX_GATEWAY_ADMIN_KEY", "MLX_GATEWAY_API_KEY"],
            show_envvar=True,
            help="The admin key, or a tenant's API key (which manages that tenant's caches only). A key given "
            "as a flag is visible to other users in `ps`: prefer the environment variable.",
        ),
        click.option("--tenant", help="Act for this tenant's caches (the admin key only)."),
        click.option("--json", "as_json", is_flag=True, help="Print the server's JSON instead of a table."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _fail_on_refusal(command: F) -> F:
    """The server's message (or the URL that could not be reached) on stderr, and exit status 1."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except AdminError as exc:
            raise click.ClickException(str(exc)) from exc

    return run  # type: ignore[return-value]


def _print_json(value: msgspec.Struct) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "never"


def _kv(cache: PrefixCacheOut) -> str:
    return f"{cache.dtype}" if cache.kv_bits is None else f"q{cache.kv_bits} (group {cache.kv_group_size})"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def _describe(cache: PrefixCacheOut) -> str:
    status = cache.status + (f" ({cache.status_reason})" if cache.status_reason else "")
    rows = [
        ("name", cache.id),
        ("model", cache.model),
        ("status", status),
        ("source", cache.source),
        ("tokens", str(cache.num_tokens)),
        ("kv", _kv(cache)),
        ("size", _size(cache.size_bytes)),
        ("hits", str(cache.hits)),
        ("created", _when(cache.created_at)),
        ("last used", _when(cache.last_used_at)),
        ("build time", f"{cache.build_seconds:.2f} s"),
        ("tokens sha256", cache.tokens_sha256),
        ("model fingerprint", cache.model_fingerprint),
        ("mlx / mlx-lm", f"{cache.mlx_version} / {cache.mlx_lm_version}"),
    ]
    if cache.integrity is not None:
        integrity = cache.integrity
        verdict = "ok" if integrity.get("ok") else f"FAILED {integrity.get('reason', '(file differs)')}"
        rows.append(("integrity", verdict))
        rows += [(k.replace("_", " "), str(integrity[k])) for k in ("file_sha256", "arrays_sha256") if k in integrity]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


@click.group()
def caches() -> None:
    """Named prefix caches on a running gateway: list, create, get, warm, delete (over its admin API)."""


@caches.command("list")
@_connection
@_fail_on_refusal
def list_caches(url: str, key: str | None, tenant: str | None, as_json: bool) -> None:
    """List the caches (of the key's tenant, or of --tenant)."""
    with AdminClient(url, key, tenant) as client:
        listing = client.caches()
    if as_json:
        _print_json(listing)
        return
    if not listing.data:
        click.echo("no prefix caches", err=True)
        return
    rows = [
        (c.id, c.model, c.status, str(c.num_tokens), _kv(c), _size(c.size_bytes), str(c.hits), _when(c.last_used_at))
        for c in listing.data
    ]
    click.echo(_table(("NAME", "MODEL", "STATUS", "TOKENS", "KV", "SIZE", "HITS", "LAST USED"), rows))


@caches.command("get")
@click.argument("name")
@click.option(
    "--verify", is_flag=True, help="Also check the file and the resident arrays against the manifest's checksum."
)
@_connection
@_fail_on_refusal
def get_cache(name: str, verify: bool, url: str, key: str | None, tenant: str | None, as_json: bool) -> None:
    """Show one cache. With --verify, exit status 1 when its integrity check fails."""
    with AdminClient(url, key, tenant) as client:
        cache = client.get(name, verify)
    if as_json:
        _print_json(cache)
    else:
        click.echo(_describe(cache))
    if verify and not (cache.integrity or {}).get("ok"):
        raise click.ClickException(f"prefix cache {name!r} failed its integrity check")


class _Progress:
    """A progress bar on a terminal; otherwise (pipes, logs, CI) a line at the first chunk, at each further
    tenth of the prefix and at the end."""

    def __init__(self, name: str, stream: TextIO) -> None:
        self._name = name
        self._stream = stream
        self._bar: Any = None
        self._done = 0
        self._tenth = -1

    def __call__(self, done: int, total: int) -> None:
        if not self._stream.isatty():
            tenth = 10 * done // max(total, 1)
            if tenth > self._tenth:
                self._tenth = tenth
                percent = 100 * done // max(total, 1)
                click.echo(f"building {self._name}: {done}/{total} tokens ({percent}%)", file=self._stream)
            return
        if self._bar is None:
            self._bar = click.progressbar(
                length=total,
                label=f"building {self._name}",
                file=self._stream,
                show_pos=True,
                show_percent=True,
                show_eta=True,
            )
            self._bar.render_progress()
        self._bar.update(done - self._done)
        self._done = done

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.render_finish()


def _read_messages(source: IO[str]) -> list[Any]:
    try:
        loaded = json.load(source)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--messages-file") from exc
    messages = loaded.get("messages") if isinstance(loaded, dict) else loaded
    if not isinstance(messages, list):
        raise click.BadParameter(
            "give a JSON list of messages, or an object with 'messages'", param_hint="--messages-file"
        )
    return messages


def _only_model(client: AdminClient) -> str:
    try:
        models = client.models()
    except AdminError as exc:
        raise click.UsageError(f"give --model (the server's models could not be listed: {exc})") from exc
    if len(models) != 1:
        raise click.UsageError(f"give --model: the server serves {', '.join(models) or 'no models'}")
    return models[0]


@caches.command("create")
@click.argument("name")
@click.option("--model", help="The served model to build it for (default: the server's model, when it has one).")
@click.option("--prompt", help="The prefix as text (the start of completion prompts).")
@click.option(
    "--prompt-file", type=click.File("r", encoding="utf-8"), help="The prefix as text, read from a file (- for stdin)."
)
@click.option(
    "--messages-file",
    type=click.File("r", encoding="utf-8"),
    help='A conversation prefix for chat: a JSON list of messages (or {"messages": [...]}), - for stdin.',
)
@click.option("--kv-bits", type=click.Choice(["4", "8"]), help="Quantise the stored KV to this many bits.")
@click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), help="Quantisation group size (default 64).")
@click.option("--replace", is_flag=True, help="Replace a cache of the same name (otherwise that is an error).")
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Stream the build's progress to stderr (a bar on a terminal). Interrupting a streamed build cancels it.",
)
@_connection
@_fail_on_refusal
def create_cache(
    name: str,
    model: str | None,
    prompt: str | None,
    prompt_file: IO[str] | None,
    messages_file: IO[str] | None,
    kv_bits: str | None,
    kv_group_size: str | None,
    replace: bool,
    progress: bool,
    url: str,
    key: str | None,
    tenant: str | None,
    as_json: bool,
) -> None:
    """Build the cache NAME from a prompt or a conversation prefix, and store it."""
    given = [
        p for p, v in (("--prompt", prompt), ("--prompt-file", prompt_file), ("--messages-file", messages_file)) if v
    ]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --prompt, --prompt-file and --messages-file")
    body: dict[str, object] = {"name": name}
    if messages_file is not None:
        body["messages"] = _read_messages(messages_file)
    else:
        body["prompt"] = prompt if prompt is not None else (prompt_file.read() if prompt_file else "")
    if kv_bits:
        body["kv_bits"] = int(kv_bits)
    if kv_group_size:
        body["kv_group_size"] = int(kv_group_size)
    if replace:
        body["replace"] = True
    with AdminClient(url, key, tenant) as client:
        body["model"] = model or _only_model(client)
        reporter = _Progress(name, sys.stderr) if progress else None
        try:
            cache = client.create(body, reporter)
        finally:
            if reporter is not None:
                reporter.finish()
    if as_json:
        _print_json(cache)
    else:
        click.echo(_describe(cache))


@caches.command("warm")
@click.argument("name")
@_connection
@_fail_on_refusal
def warm_cache(name: str, url: str, key: str | None, tenant: str | None, as_json: bool) -> None:
    """Load the cache NAME into the server's memory now, so the next request naming it reads no file."""
    with AdminClient(url, key, tenant) as client:
        warmed = client.warm(name)
    if as_json:
        _print_json(warmed)
    elif warmed.was_resident:
        click.echo(f"{name}: already in memory ({_size(warmed.bytes_in_memory)})")
    else:
        click.echo(f"{name}: loaded into memory ({_size(warmed.bytes_in_memory)} in {warmed.load_ms:.1f} ms)")


@caches.command("delete")
@click.argument("name")
@_connection
@_fail_on_refusal
def delete_cache(name: str, url: str, key: str | None, tenant: str | None, as_json: bool) -> None:
    """Delete the cache NAME (its file and manifest; requests using it finish normally)."""
    with AdminClient(url, key, tenant) as client:
        deleted = client.delete(name)
    if as_json:
        _print_json(deleted)
    else:
        click.echo(f"deleted {deleted.id}")
