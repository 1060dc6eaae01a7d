"""Who a request is, in one place: the tenant guard (inference) and the access guard (cache management).

The rule: with no API keys and no admin key everything is open and belongs to the default tenant. An admin
key alone guards prefix-cache management and leaves inference open. API keys guard everything under
``/v1``; a tenant key manages only its tenant's caches, the admin key may act for any tenant.
``/metrics`` (every tenant's figures) is open while no key is configured, and then needs the admin key.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from litestar import Request
from litestar.datastructures import State

from gateway.config import Config
from gateway.errors import AuthenticationError, Forbidden
from gateway.tenancy.keys import digest, entry_digest
from gateway.tenancy.rate_limits import set_tenant

__all__ = ["Access", "bearer_token", "check_metrics_access", "is_admin_request", "provide_access", "provide_tenant"]


@dataclass(frozen=True, slots=True)
class Access:
    """Whom a cache-management request acts for: its tenant, and whether it may act for any tenant."""

    tenant: str
    is_admin: bool

    def tenant_for(self, requested: str | None) -> str:
        """The tenant whose caches the request names (``"tenant"`` in a body, ``?tenant=``).

        Raises:
            Forbidden: a tenant's key names another tenant.
        """
        if requested is None or requested == self.tenant:
            return self.tenant
        if not self.is_admin:
            raise Forbidden("A tenant's key can only manage that tenant's prefix caches")
        return requested


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _is_admin(token: str, admin_key: str | None) -> bool:
    if not admin_key:  # none configured ("" counts as none)
        return False
    return hmac.compare_digest(digest(token), entry_digest(admin_key))


def is_admin_request(request: Request, config: Config) -> bool:
    """Whether the request carries the admin key (False when the server has none)."""
    token = bearer_token(request)
    return token is not None and _is_admin(token, config.admin_key)


def _tenant_of(token: str, api_keys: Mapping[str, str]) -> str | None:
    """The tenant of ``token``, compared against every key, whatever its form, in constant time (no early
    exit; a hashed entry matches the key whose digest it holds, never the digest sent as a key)."""
    given = digest(token)
    found = None
    for key, tenant in api_keys.items():
        if hmac.compare_digest(given, entry_digest(key)):
            found = tenant
    return found


async def provide_tenant(request: Request, state: State) -> str:
    """The tenant an inference request belongs to: its API key's, or the default tenant when auth is off."""
    config: Config = state.config
    if not config.auth_enabled:
        set_tenant(request.scope, config.default_tenant)
        return config.default_tenant
    token = bearer_token(request)
    if token is None:
        raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'")
    tenant = _tenant_of(token, config.api_keys)
    if tenant is None:
        raise AuthenticationError("Incorrect API key provided")
    set_tenant(request.scope, tenant)
    return tenant


async def provide_access(request: Request, state: State) -> Access:
    """The guard of every route that manages prefix caches (admin routes and the seed aliases alike)."""
    config: Config = state.config
    if not config.auth_enabled and not config.admin_key:
        return Access(config.default_tenant, is_admin=True)  # auth off: one trusted operator
    needed = "an API key" if config.auth_enabled else "the admin key"
    token = bearer_token(request)
    if token is None:
        raise AuthenticationError(f"Managing prefix caches needs {needed}: send 'Authorization: Bearer <key>'")
    is_admin = _is_admin(token, config.admin_key)
    tenant = _tenant_of(token, config.api_keys)  # both checked, so the time says nothing about which
    if is_admin:
        return Access(config.default_tenant, is_admin=True)
    if tenant is None:
        raise AuthenticationError("Incorrect API key provided")
    return Access(tenant, is_admin=False)


def check_metrics_access(request: Request, config: Config) -> None:
    """The guard of ``/metrics``: it names every tenant, so once any key is configured only the admin key
    reads it (Prometheus sends it with ``authorization: {credentials: <admin key>}``).

    Raises:
        AuthenticationError: no token, or one that is no key of this server.
        Forbidden: a tenant's key, or API keys configured without an admin key (no one may read it).
    """
    if not config.auth_enabled and not config.admin_key:
        return
    token = bearer_token(request)
    if token is None:
        raise AuthenticationError("Reading /metrics needs the admin key: send 'Authorization: Bearer <key>'")
    is_admin = _is_admin(token, config.admin_key)
    tenant = _tenant_of(token, config.api_keys)  # both checked, so the time says nothing about which
    if is_admin:
        return
    if tenant is None:
        raise AuthenticationError("Incorrect API key provided")
    if not config.admin_key:
        raise Forbidden("Reading /metrics needs the admin key, and this server has none (set admin_key)")
    raise Forbidden("A tenant's key cannot read /metrics (it holds every tenant's figures); use the admin key")
