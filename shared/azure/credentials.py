"""The credential for ARM: managed identity where the platform offers one, else DefaultAzureCredential.

:func:`check_credential` asks it for one ARM token before a CLI run touches any VM, and turns a
failure into one line that says what to do (``NoCredential``; the CLI exits 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.credentials_async import AsyncSupportsTokenInfo, AsyncTokenCredential
from azure.core.exceptions import AzureError
from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential

from shared.settings import Settings


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
    """The first token request per scope set made once, over a credential whose cache is then shared.

    azure-identity caches tokens per credential instance, in memory, and "the in-memory cache may be
    cleared by creating a new credential instance" (Azure/azure-sdk-for-python
    sdk/identity/azure-identity/TOKEN_CACHING.md; the managed-identity client keeps its ``TokenCache``
    in ``azure/identity/_internal/managed_identity_client.py``). Its async ``get_token`` holds no lock
    (``azure/identity/aio/_internal/get_token_mixin.py``: look in the cache, else request), so
    invocations that start together on a cold process would each ask the identity endpoint. Here the
    first call per scope set holds a lock; those that arrive meanwhile wait and then find its token in
    the cache. Once a call has succeeded, calls go straight through: a refresh is azure-identity's
    (it asks again when less than 300 s are left, at most every 30 s, and keeps the valid token if
    the refresh fails, ``azure/identity/_internal/utils.py`` ``get_refresh_status``), and callers
    are not held behind one slow refresh. Bound to the loop it first waits on (``asyncio.Lock``), as
    the per-loop client cache (``shared.clients``) is.
    """

    def __init__(self, inner: AsyncTokenCredential) -> None:
        self._inner = inner
        self._locks: dict[tuple[object, ...], asyncio.Lock] = {}
        self._warm: set[tuple[object, ...]] = set()

    @contextlib.asynccontextmanager
    async def _first(self, key: tuple[object, ...]) -> AsyncIterator[None]:
        if key in self._warm:
            yield
            return
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            yield
            self._warm.add(key)

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        async with self._first(("token", scopes, claims, tenant_id, enable_cae)):
            return await self._inner.get_token(
                *scopes, claims=claims, tenant_id=tenant_id, enable_cae=enable_cae, **kwargs
            )

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        """What azure-core's bearer policy calls when a credential has it (AsyncSupportsTokenInfo)."""
        given = options or {}
        inner = self._inner
        async with self._first(("info", scopes, tuple(sorted(given.items())))):
            if isinstance(inner, AsyncSupportsTokenInfo):
                return await inner.get_token_info(*scopes, options=options)
            token = await inner.get_token(
                *scopes,
                claims=given.get("claims"),
                tenant_id=given.get("tenant_id"),
                enable_cae=bool(given.get("enable_cae", False)),
            )
            return AccessTokenInfo(token.token, token.expires_on)

    async def close(self) -> None:
        await self._inner.close()

    async def __aenter__(self) -> SingleFlightCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
