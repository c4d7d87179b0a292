"""One credential and one set of clients per worker process and event loop (issue 12, item 3).

The Functions host gives an ``async def`` function to the Python worker's own event loop, which
"shares the event loop with the customer's async function and it's capable for handling multiple
requests concurrently" (MicrosoftDocs/azure-docs articles/azure-functions/
python-scale-performance-reference.md, "Understanding async in Python worker"); only ``def``
functions go to the thread pool sized by ``PYTHON_THREADPOOL_THREAD_COUNT``, and
``FUNCTIONS_WORKER_PROCESS_COUNT`` adds worker processes, each with its own loop. Microsoft's
advice for Functions is one client per app, not one per invocation ("DO NOT create a new client
with every function invocation", articles/azure-functions/manage-connections.md). So:

- **One set per event loop.** aiohttp sessions (and so every SDK client over them) belong to the
  loop they were made in, so the cache is keyed by the running loop; a ``def`` function that ran
  its own loop in a pool thread would get a set of its own. Within a loop, by the settings and the
  identity variables they were built from (tests and the CLI change them; a host does not).
- **Safe across concurrent invocations.** The set is built without awaiting (no interleaving on one
  loop), the clients keep no per-invocation state, and the credential is a
  :class:`~shared.azure.credentials.SingleFlightCredential`: azure-identity caches tokens per
  credential instance, so one instance per process means one token request per token lifetime
  instead of one per message, even when many invocations start together.
- **Closed with the loop.** The first use starts a small async generator on the loop whose
  ``finally`` closes the set: ``asyncio.run`` (which the worker's ``main`` uses, and the test
  runner's loop runner too) ends with ``loop.shutdown_asyncgens()``, which closes it, so sessions
  are closed while their loop still runs (Python docs, asyncio-eventloop
  ``loop.shutdown_asyncgens``). :func:`close_shared_clients` does it explicitly.

A broken storage table or queue is not the clients' fault: ``shared.triggers`` still checks what
it created again after ``TableMissing``/``QueueMissing``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field

from shared.azure.compute import ComputeGateway
from shared.azure.credentials import SingleFlightCredential, make_credential
from shared.azure.inventory import Inventory
from shared.ledger import Ledger
from shared.settings import WORK_QUEUE, Settings
from shared.workqueue import WorkQueue

# What ManagedIdentityCredential / DefaultAzureCredential read from the environment themselves: a
# set built under one identity is never handed out under another.
CREDENTIAL_ENV = (
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
)


@dataclass(eq=False)
class SharedClients:
    """The clients every invocation on one loop uses; made on first use, closed together."""

    settings: Settings
    credential: SingleFlightCredential
    _compute: ComputeGateway | None = None
    _inventory: Inventory | None = None
    _ledger: Ledger | None = None
    _queues: dict[str, WorkQueue] = field(default_factory=dict)
    closed: bool = False

    @classmethod
    def build(cls, settings: Settings, env: Mapping[str, str] | None) -> SharedClients:
        return cls(settings, SingleFlightCredential(make_credential(settings, env)))

    def compute(self) -> ComputeGateway:
        if self._compute is None:
            self._compute = ComputeGateway(self.credential, self.settings)
        return self._compute

    def inventory(self) -> Inventory:
        if self._inventory is None:
            self._inventory = Inventory(self.credential, self.settings)
        return self._inventory

    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger.from_settings(self.settings, self.credential)
        return self._ledger

    def queue(self, name: str = WORK_QUEUE) -> WorkQueue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = WorkQueue.from_settings(self.settings, self.credential, name=name)
        return queue

    async def aclose(self) -> None:
        """Close every client, then the credential; each close is tried even if one fails."""
        self.closed = True
        closables = [self._compute, self._inventory, self._ledger, *self._queues.values()]
        self._compute = self._inventory = self._ledger = None
        self._queues = {}
        errors: list[BaseException] = []
        for closable in [*closables, self.credential]:
            if closable is None:
                continue
            try:
                await closable.close()
            except Exception as error:  # noqa: BLE001 (close the rest, then raise the first)
                errors.append(error)
        if errors:
            raise errors[0]


_Key = tuple[Settings, tuple[str | None, ...]]


@dataclass(eq=False)
class _LoopClients:
    sets: dict[_Key, SharedClients] = field(default_factory=dict)
    closer: AsyncGenerator[None, None] | None = None

    async def aclose(self) -> None:
        sets, self.sets = list(self.sets.values()), {}
        for clients in sets:
            await clients.aclose()


_lock = threading.Lock()
_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClients] = weakref.WeakKeyDictionary()


async def _close_at_shutdown(
    loop: asyncio.AbstractEventLoop, entry: _LoopClients
) -> AsyncGenerator[None, None]:
    """Suspended for the loop's life; ``loop.shutdown_asyncgens()`` (or :func:`close_shared_clients`)
    resumes it into ``finally``, inside the loop, where the sessions can still be closed. It then
    forgets the loop's entry, so that neither it nor the loop is kept (the generator's finalizer
    refers to its loop)."""
    try:
        yield
    finally:
        with _lock:
            if _by_loop.get(loop) is entry:
                del _by_loop[loop]
            entry.closer = None
        await entry.aclose()


def _key(settings: Settings, env: Mapping[str, str] | None) -> _Key:
    source = os.environ if env is None else env
    return settings, tuple(source.get(name) for name in CREDENTIAL_ENV)


async def shared_clients(settings: Settings, env: Mapping[str, str] | None = None) -> SharedClients:
    """The set for the running loop and these settings, built on first use."""
    loop = asyncio.get_running_loop()
    key = _key(settings, env)
    with _lock:
        entry = _by_loop.get(loop)
        if entry is None:
            entry = _by_loop[loop] = _LoopClients()
        clients = entry.sets.get(key)
        if clients is None or clients.closed:
            clients = entry.sets[key] = SharedClients.build(settings, env)
        closer = None
        if entry.closer is None:
            closer = entry.closer = _close_at_shutdown(loop, entry)
    if closer is not None:
        # The first step registers the generator with this loop (sys.set_asyncgen_hooks) and stops
        # at its yield without awaiting anything, so no other invocation runs in between.
        await anext(closer)
    return clients


async def close_shared_clients() -> None:
    """Close the running loop's sets now (a graceful shutdown; tests). The next use builds anew."""
    loop = asyncio.get_running_loop()
    with _lock:
        entry = _by_loop.get(loop)
        closer = entry.closer if entry is not None else None
    if closer is not None:
        await closer.aclose()  # runs its finally: forgets the entry, closes the sets
    elif entry is not None:
        with _lock:
            _by_loop.pop(loop, None)
        await entry.aclose()
