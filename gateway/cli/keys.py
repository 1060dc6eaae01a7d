"""``mlx-gateway keys``: fresh API keys, and the config line that serves each."""

from __future__ import annotations

import click

from gateway.tenancy.keys import hashed_form, new_key

__all__ = ["keys"]


@click.group()
def keys() -> None:
    """API keys: make a fresh one (the server keeps none of its own)."""


@keys.command("new")
@click.option("--tenant", required=True, help="The tenant the key belongs to.")
@click.option(
    "--hashed",
    is_flag=True,
    help="Print the config line with the key's SHA-256 digest instead of the key (a leaked file leaks no key).",
)
def new(tenant: str, hashed: bool) -> None:
    """Print a random key (256 bits, prefix mgw-) on the first line, then the line to add to the config.

    Only the first line is secret; give it to the tenant. With --hashed the config holds no key at all.
    """
    if not tenant or any(c in tenant for c in ':,"\n'):
        raise click.BadParameter("a tenant name without ':', ',', '\"' or newlines", param_hint="--tenant")
    key = new_key()
    entry = hashed_form(key) if hashed else key
    click.echo(key)
    click.echo(f"# in the config file's api_keys table (TOML), or as MLX_GATEWAY_API_KEYS / --api-key {entry}:{tenant}")
    click.echo(f'api_keys = {{ "{entry}" = "{tenant}" }}')
