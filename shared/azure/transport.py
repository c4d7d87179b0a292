"""One aiohttp session per adapter, with one TLS context: connection reuse for every SDK client.

Handing azure-core a CA *path* (``connection_verify=<file>``) makes its aiohttp transport build a
new SSL context for every request, and aiohttp then cannot reuse connections: a TLS handshake per
request (docs/performance.md measured 1.70× slower and 20× the memory). A session whose connector
holds one context avoids that, with the system CA store in Azure or ``AZURE_CA_BUNDLE`` locally.
"""

from __future__ import annotations

import ssl

import aiohttp
from azure.core.pipeline.transport import AioHttpTransport

from shared.settings import Settings


def tls_session(settings: Settings, *, limit: int = 100) -> aiohttp.ClientSession:
    """A session for Azure endpoints; call inside the running event loop."""
    context = ssl.create_default_context(cafile=settings.ca_bundle)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=limit), trust_env=True)


def shared_transport(session: aiohttp.ClientSession) -> AioHttpTransport:
    """A transport that uses ``session`` without closing it (the adapter closes the session)."""
    return AioHttpTransport(session=session, session_owner=False)
