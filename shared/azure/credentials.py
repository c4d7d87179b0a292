"""The credential for ARM: managed identity where the platform offers one, else DefaultAzureCredential.

:func:`check_credential` asks it for one ARM token before a CLI run touches any VM, and turns a
failure into one line that says what to do (``NoCredential``; the CLI exits 2).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.credentials_async import AsyncSupportsTokenInfo, AsyncTokenCredential
from azure.core.exceptions import AzureError
from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential

from shared.settings import Settings

TokenT = TypeVar("TokenT", AccessToken, AccessTokenInfo)


def make_credential(settings: Settings, env: Mapping[str, str] | None = None) -> AsyncTokenCredential:
    """App Service / Functions (and the simulator) expose IDENTITY_ENDPOINT: use that identity directly.

    ``AZURE_CLIENT_ID`` selects a user-assigned identity. Elsewhere (an admin's laptop) the default
    chain applies, e.g. ``az login``, with the authority of the configured cloud.
    """
    env = os.environ if env is None else env
    client_id = env.get("AZURE_CLIENT_ID") or None
    if env.get("IDENTITY_ENDPOINT"):
        return ManagedIdentityCredential(client_id=client_id)
    return DefaultAzureCredential(
        authority=settings.cloud.authority_host, managed_identity_client_id=client_id
    )


CREDENTIAL_CHECK_TIMEOUT_S = 30.0
"""How long the CLI's one token request before any VM may take. DefaultAzureCredential tries its
sources in turn (the Azure CLI one runs ``az account get-access-token``, allowed 10 s by
azure-identity); an answer that takes longer than this is no usable credential for a run."""

_TRIED = "Attempted credentials:"
_MITIGATE = "To mitigate this issue"


class NoCredential(Exception):
    """No token for ARM: the message is one line that says what to do, then what was tried."""


async def check_credential(
    credential: AsyncTokenCredential,
    settings: Settings,
    env: Mapping[str, str] | None = None,
    *,
    timeout_s: float = CREDENTIAL_CHECK_TIMEOUT_S,
) -> None:
    """Get one token for the cloud's ARM scope, or raise :class:`NoCredential` with one line.

    A run that would otherwise fail on every VM with the credential's message as a Run Command
    failure is stopped here, before any VM (the CLI exits 2).
    """
    env = os.environ if env is None else env
    try:
        async with asyncio.timeout(timeout_s):
            await credential.get_token(settings.cloud.arm_scope)
    except TimeoutError as error:
        raise NoCredential(
            f"{_what_to_do(env)} (no token for {settings.cloud.arm_scope} within {timeout_s:g} s)"
        ) from error
    except AzureError as error:  # ClientAuthenticationError, CredentialUnavailableError, ServiceRequestError
        raise NoCredential(describe_failure(str(error), env)) from error


def _what_to_do(env: Mapping[str, str]) -> str:
    if env.get("IDENTITY_ENDPOINT"):
        return (
            "no Azure credential: the managed identity endpoint (IDENTITY_ENDPOINT) gave no token: check "
            "IDENTITY_ENDPOINT and IDENTITY_HEADER (and AZURE_CLIENT_ID for a user-assigned identity), "
            "or unset IDENTITY_ENDPOINT to use az login"
        )
    return (
        "no Azure credential: run az login, or set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET "
        "(or AZURE_CLIENT_CERTIFICATE_PATH) for a service principal, or run where a managed identity is "
        "available"
    )


def describe_failure(message: str, env: Mapping[str, str] | None = None) -> str:
    """One line: what to do first, then what azure-identity tried, each source with its whole answer.

    DefaultAzureCredential's message is ``<Class> failed to retrieve a token from the included
    credentials.``, then ``Attempted credentials:`` with one tab-indented ``<Name>: <message>`` per
    source (a message may continue on the next lines), then ``To mitigate this issue, please refer to
    the troubleshooting guidelines here at <url>.`` (azure-identity ``_credentials/chained.py``,
    ``_get_error_message`` and ``get_token``; Azure/azure-sdk-for-python
    ``sdk/identity/azure-identity/azure/identity/_credentials/chained.py``). Each source's own
    message ends with what to do about it ("Please run 'az login' to set up an account", "run
    `azd auth login`"), so nothing is cut: the line is long, but its start says what to do.
    """
    env = os.environ if env is None else env
    head = _what_to_do(env)
    lines = message.splitlines()
    if not any(line.strip() == _TRIED for line in lines):  # one credential, not a chain
        source = "ManagedIdentityCredential" if env.get("IDENTITY_ENDPOINT") else "azure-identity"
        return f"{head}. {source} said: {_flat(message)}"
    attempts: list[str] = []
    guide = ""
    in_attempts = False
    for line in lines:
        if line.strip() == _TRIED:
            in_attempts = True
            continue
        if line.startswith(_MITIGATE):
            guide = _flat(line.split(" at ", 1)[-1]).rstrip(".")
            in_attempts = False
            continue
        if not in_attempts:
            continue
        if line.startswith("\t"):
            attempts.append(line.strip())
        elif attempts and line.strip():
            attempts[-1] += " " + line.strip()
    cls = _flat(lines[0]).split(" ", 1)[0] if lines else "DefaultAzureCredential"
    tried = "; ".join(_flat(a).rstrip(".") for a in attempts) or "nothing"
    tail = f" (troubleshooting: {guide})" if guide else ""
    return f"{head}. {cls} tried: {tried}{tail}"


def _flat(text: str) -> str:
    return " ".join(text.split())


class SingleFlightCredential:
    """One token request in flight per scope set, shared by every caller that arrives meanwhile.

    azure-identity caches tokens per credential instance, in memory, and "the in-memory cache may be
    cleared by creating a new credential instance" (Azure/azure-sdk-for-python
    sdk/identity/azure-identity/TOKEN_CACHING.md; the managed-identity client keeps its ``TokenCache``
    in ``azure/identity/_internal/managed_identity_client.py``). Its async ``get_token`` holds no lock
    (``azure/identity/aio/_internal/get_token_mixin.py``, ``_get_token_base``: look in the cache, and
    when ``get_refresh_status`` says REQUIRED, a missing or expired token, request one), so callers
    that start together on a cold process, or that all find the token expired mid-run, would each ask
    the identity endpoint. Here, while no token is held for a scope set (none yet, or the last one
    handed out has expired), the first caller's request is the only one: it runs as a task of its
    own, and every caller that arrives before it ends awaits that task and gets its token or its
    failure, at once (a failure is not remembered: the next caller asks again). A caller cancelled
    while it waits (its invocation timed out) leaves the request to the others.

    While a token is held, calls go straight through: a refresh is azure-identity's (it asks again
    when less than 300 s are left, at most every 30 s, and keeps the valid token if the refresh fails,
    ``azure/identity/_internal/utils.py`` ``get_refresh_status``), and callers are not held behind one
    slow refresh. Bound to the loop its requests run on, as the per-loop client cache
    (``shared.clients``) is; :meth:`close` cancels a request still in flight.
    """

    def __init__(self, inner: AsyncTokenCredential, *, clock: Callable[[], float] = time.time) -> None:
        self._inner = inner
        self._clock = clock
        self._flights: dict[tuple[object, ...], asyncio.Future[Any]] = {}
        self._held_until: dict[tuple[object, ...], float] = {}

    async def _single(self, key: tuple[object, ...], request: Callable[[], Awaitable[TokenT]]) -> TokenT:
        if self._clock() < self._held_until.get(key, 0.0):
            return self._hold(key, await request())
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = asyncio.ensure_future(request())
            flight.add_done_callback(functools.partial(self._landed, key))
        token: TokenT = await asyncio.shield(flight)
        return token

    def _hold(self, key: tuple[object, ...], token: TokenT) -> TokenT:
        self._held_until[key] = max(self._held_until.get(key, 0.0), float(token.expires_on))
        return token

    def _landed(self, key: tuple[object, ...], flight: asyncio.Future[Any]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if flight.cancelled():
            return
        if flight.exception() is None:  # (also marks a failure nobody awaited any more as seen)
            self._hold(key, flight.result())

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        def request() -> Awaitable[AccessToken]:
            return self._inner.get_token(
                *scopes, claims=claims, tenant_id=tenant_id, enable_cae=enable_cae, **kwargs
            )

        return await self._single(("token", scopes, claims, tenant_id, enable_cae), request)

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        """What azure-core's bearer policy calls when a credential has it (AsyncSupportsTokenInfo)."""
        given = options or {}
        inner = self._inner

        async def request() -> AccessTokenInfo:
            if isinstance(inner, AsyncSupportsTokenInfo):
                return await inner.get_token_info(*scopes, options=options)
            token = await inner.get_token(
                *scopes,
                claims=given.get("claims"),
                tenant_id=given.get("tenant_id"),
                enable_cae=bool(given.get("enable_cae", False)),
            )
            return AccessTokenInfo(token.token, token.expires_on)

        return await self._single(("info", scopes, tuple(sorted(given.items()))), request)

    async def close(self) -> None:
        flights, self._flights = list(self._flights.values()), {}
        for flight in flights:
            flight.cancel()
        await self._inner.close()

    async def __aenter__(self) -> SingleFlightCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
