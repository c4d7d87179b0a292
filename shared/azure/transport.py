"""One aiohttp session per adapter, with one TLS context: connection reuse for every SDK client.

Handing azure-core a CA *path* (``connection_verify=<file>``) makes its aiohttp transport build a
new SSL context for every request, and aiohttp then cannot reuse connections: a TLS handshake per
request (docs/performance.md measured 1.70× slower and 20× the memory). A session whose connector
holds one context avoids that, with the system CA store in Azure or ``AZURE_CA_BUNDLE`` locally.
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Mapping
from typing import Any, Generic, Protocol, Self, TypeVar

import aiohttp
from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.core.pipeline.transport import AioHttpTransport
from azure.core.rest import HttpRequest

from shared.settings import Settings

ClientT = TypeVar("ClientT", bound="Closable")


def tls_session(settings: Settings, *, limit: int = 100) -> aiohttp.ClientSession:
    """A session for Azure endpoints; call inside the running event loop."""
    context = ssl.create_default_context(cafile=settings.ca_bundle)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context, limit=limit), trust_env=proxy_in_env()
    )


def proxy_in_env() -> bool:
    """Whether the environment names a proxy (``HTTPS_PROXY`` and the like, as urllib reads them).

    aiohttp's ``trust_env`` then routes through it (``NO_PROXY`` honoured). Without one it stays
    off: with it on, aiohttp looks up ``~/.netrc`` and the proxy variables in a worker thread for
    every request, a quarter of the engine's CPU per request and a thread hop that stalls the event
    loop (docs/performance.md); a ``.netrc`` entry would not apply to Azure's bearer tokens anyway.
    """
    return bool(urllib.request.getproxies())


def shared_transport(session: aiohttp.ClientSession) -> AioHttpTransport:
    """A transport that uses ``session`` without closing it (the adapter closes the session)."""
    return AioHttpTransport(session=session, session_owner=False)


class Closable(Protocol):
    async def close(self) -> None: ...


class PooledClient(Generic[ClientT]):
    """Base of the adapters that own one SDK client over one (possibly shared) session.

    Subclasses build their SDK client in ``_make_client(transport)``; it is created on first use,
    inside the running loop (aiohttp sessions belong to one loop), and closed with the session when
    the adapter was the one that opened it.
    """

    def __init__(self, settings: Settings, session: aiohttp.ClientSession | None) -> None:
        self._settings = settings
        self._session = session
        self._owns_session = session is None
        self._client: ClientT | None = None

    def _make_client(self, transport: AioHttpTransport) -> ClientT:
        raise NotImplementedError

    def _sdk(self) -> ClientT:
        if self._client is None:
            if self._session is None:
                self._session = tls_session(self._settings)
            self._client = self._make_client(shared_transport(self._session))
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class RequestCounter(SansIOHTTPPolicy[HttpRequest, Any]):
    """Counts every HTTP request sent to ARM, polls and retries included (benchmarks report it)."""

    def __init__(self) -> None:
        self.count = 0

    def on_request(self, request: PipelineRequest[HttpRequest]) -> None:
        self.count += 1


class SubscriptionClients(Generic[ClientT]):
    """Base of the ARM adapters with one SDK client per subscription over one session they own.

    Subclasses build a client in ``_make_client(subscription_id, transport)`` with
    ``**self._arm_options(transport)`` and their own retry policy; clients are made on first use, inside the
    running loop, all on one connection pool, and closed with the session.
    """

    def __init__(self, settings: Settings, *, session_limit: int = 100) -> None:
        self._settings = settings
        self._session_limit = session_limit
        self._clients: dict[str, ClientT] = {}
        self._session: aiohttp.ClientSession | None = None
        self._transport: AioHttpTransport | None = None
        self._counter = RequestCounter()

    @property
    def requests(self) -> int:
        """HTTP requests sent so far (polls and retries included)."""
        return self._counter.count

    def _make_client(self, subscription_id: str, transport: AioHttpTransport) -> ClientT:
        raise NotImplementedError

    def _arm_options(self, transport: AioHttpTransport) -> dict[str, Any]:
        """What every ARM management client of ours is built with: the cloud's endpoint and scope,
        the poll interval, the request counter and the shared pool (the retry policy is the
        subclass's own)."""
        return {
            "base_url": self._settings.arm_endpoint,
            "credential_scopes": [self._settings.cloud.arm_scope],
            "polling_interval": self._settings.poll_interval_s,
            "per_retry_policies": [self._counter],
            "transport": transport,
        }

    def _shared_transport(self) -> AioHttpTransport:
        """The one connection pool of every subscription's client, opened on first use."""
        if self._transport is None:
            self._session = tls_session(self._settings, limit=self._session_limit)
            self._transport = shared_transport(self._session)
        return self._transport

    def _client(self, subscription_id: str) -> ClientT:
        key = subscription_id.lower()
        client = self._clients.get(key)
        if client is None:
            client = self._make_client(subscription_id, self._shared_transport())
            self._clients[key] = client
        return client

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()
        session, self._session, self._transport = self._session, None, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def sdk_json(model: Any) -> Mapping[str, Any]:
    """The REST JSON of a (hybrid) SDK model, or of an answer that already is one."""
    if isinstance(model, Mapping):
        return model
    as_dict = getattr(model, "as_dict", None)
    if callable(as_dict):
        value = as_dict()
        if isinstance(value, Mapping):
            return value
    raise TypeError(f"unexpected SDK model {type(model).__name__}")
