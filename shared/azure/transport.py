"""One aiohttp session per adapter, with one TLS context: connection reuse for every SDK client.

Handing azure-core a CA *path* (``connection_verify=<file>``) makes its aiohttp transport build a
new SSL context for every request, and aiohttp then cannot reuse connections: a TLS handshake per
request (docs/performance.md measured 1.70× slower and 20× the memory). A session whose connector
holds one context avoids that, with the system CA store in Azure or ``AZURE_CA_BUNDLE`` locally.
"""

from __future__ import annotations

import ssl
from typing import Generic, Protocol, Self, TypeVar

import aiohttp
from azure.core.pipeline.transport import AioHttpTransport

from shared.settings import Settings

ClientT = TypeVar("ClientT", bound="Closable")


def tls_session(settings: Settings, *, limit: int = 100) -> aiohttp.ClientSession:
    """A session for Azure endpoints; call inside the running event loop."""
    context = ssl.create_default_context(cafile=settings.ca_bundle)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=limit), trust_env=True)


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
