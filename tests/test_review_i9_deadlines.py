"""Review of issue 9 (item 2): every ledger operation of a workflow ends within its budget.

``Settings.workflow_worst_case_s`` counts six ledger operations at ``LEDGER_WRITE_BUDGET_S`` each
(``LEDGER_TRIES`` tries of ``LEDGER_TRY_TIMEOUT_S``), and start-up refuses settings whose worst case
does not fit the lease and host.json's ``functionTimeout``. History rows and the release keep that
budget (``LedgerBase._retrying``), but the lease's ``acquire`` and ``renew`` had no deadline of their
own: against a Table endpoint that takes the connection and never answers (a black-holed route,
an overloaded front end) they waited for azure-core's read timeout (300 s by default,
``ConnectionConfiguration``) on each of azure-data-tables' retries (``TablesRetryPolicy``: 3 read
retries by default), about 20 minutes each, twice per workflow before the remediation POST.
The host then times the invocation out, and for a Python app restarts the whole language worker,
ending every other workflow running in it (Azure/azure-webjobs-sdk#2624, "Function timeout":
"On function invocation timeout, host tries to restart language worker process").

The endpoint here is a loopback socket that accepts and never answers; the per-try deadline is
scaled down (as bench/chaos.py does) so that the test takes a second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.data.tables.aio import TableClient

from shared.ledger import Lease, Ledger, LedgerError
from shared.ledger import _table as ledger_table
from shared.model import VmId

VM = VmId.parse(
    "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg/providers/"
    "Microsoft.Compute/virtualMachines/web-01"
)
# Azurite's well-known development account (public, not a secret): the client only signs with it.
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A TCP port that accepts every connection and never sends a byte back."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        server.close()


@contextlib.asynccontextmanager
async def ledger_at(port: int) -> AsyncIterator[Ledger]:
    connection = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={DEV_KEY};TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
    table = TableClient.from_connection_string(connection, "ledger" + uuid.uuid4().hex[:8])
    async with Ledger(table, lease_s=60) as ledger:
        yield ledger


@pytest.fixture
def short_tries(monkeypatch: pytest.MonkeyPatch) -> float:
    """The ledger's per-try deadline and backoff scaled down; returns the write budget they give."""
    monkeypatch.setattr(ledger_table, "LEDGER_TRY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(ledger_table.LedgerBase, "retry_backoff_s", 0.01)
    return ledger_table.LEDGER_TRIES * 0.3 + 0.01 * ((1 << (ledger_table.LEDGER_TRIES - 1)) - 1)


async def test_a_renew_against_a_table_that_never_answers_ends_within_the_write_budget(
    short_tries: float,
) -> None:
    with black_hole() as port:
        async with ledger_at(port) as ledger:
            now = datetime.now(UTC)
            lease = Lease(VM, "w", "token", now + timedelta(seconds=60), None, etag='W/"x"')
            started = asyncio.get_running_loop().time()
            with pytest.raises(LedgerError):
                # On main this waited for the SDK's read timeout and retries (minutes).
                await asyncio.wait_for(ledger.renew(lease, intent={"phase": "remediate"}), 10)
            assert asyncio.get_running_loop().time() - started <= short_tries + 1.0


async def test_an_acquire_against_a_table_that_never_answers_ends_within_the_write_budget(
    short_tries: float,
) -> None:
    with black_hole() as port:
        async with ledger_at(port) as ledger:
            started = asyncio.get_running_loop().time()
            with pytest.raises(LedgerError):
                await asyncio.wait_for(ledger.acquire(VM, owner="w"), 10)
            assert asyncio.get_running_loop().time() - started <= short_tries + 1.0


async def test_a_renew_whose_answer_was_lost_is_still_ours_after_the_retry(
    azurite: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first try lands, its answer is lost; the retry meets 412 from our own write. That is not a
    lost lease (the row still has this lease's token and the expiry we wrote): no spurious abort."""
    from azure.core.exceptions import ServiceResponseError

    from shared.ledger.lease import LeaseStore
    from shared.model import Outcome, OutcomeKind

    table = TableClient.from_connection_string(azurite.connection_string, "ledger" + uuid.uuid4().hex[:8])
    monkeypatch.setattr(ledger_table.LedgerBase, "retry_backoff_s", 0.01)
    async with Ledger(table, lease_s=60) as ledger:
        await ledger.create_table_if_needed()
        lease = await ledger.acquire(VM, owner="w")
        assert lease is not None
        real = LeaseStore._merge_if_ours
        lost = {"left": 1}

        async def merge(self: Ledger, columns: dict[str, Any], etag: str) -> dict[str, Any] | None:
            written = await real(self, columns, etag)
            if lost["left"]:
                lost["left"] -= 1
                raise ServiceResponseError("the answer was lost")
            return written

        monkeypatch.setattr(LeaseStore, "_merge_if_ours", merge)
        await ledger.renew(lease, intent={"phase": "remediate"})  # raised LeaseLost
        monkeypatch.setattr(LeaseStore, "_merge_if_ours", real)
        await ledger.release(lease, Outcome(str(VM), OutcomeKind.HEALTHY, "kms-client-licensed"))
        stored = await ledger.last_verdict(VM)
        assert stored is not None and stored.outcome is OutcomeKind.HEALTHY  # the etag was adopted
