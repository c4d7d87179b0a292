"""Review of issue 9 (item 1, "make the verdict converge"): the sweep does not trust a verdict that a
dead workflow's pending intent has overtaken.

A worker killed after announcing a remediation leaves ``pendingIntent`` on the VM's state row
next to the verdict stored before it. The next holder of the lease ignores that verdict and
detects again (docs/reliability.md, "Delivery guarantees"), but only if a delivery comes: when the
message itself was lost or ended in the poison queue (``failed: poison`` is a history row, not a
verdict), the only producer left is the sweep (docs/reliability.md, "What survives a storage
loss": "what was lost comes back through the sweep timer"). The sweep skipped every VM whose
``verifiedAt`` was within ``RECHECK_AFTER_HOURS``, the half-remediated one included, so its stored
verdict (``healthy``, say, from before the re-key began) stood for up to a day.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.data.tables.aio import TableClient

from shared.ledger import Ledger
from shared.model import Outcome, OutcomeKind, VmId

VM = VmId.parse(
    "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg/providers/"
    "Microsoft.Compute/virtualMachines/web-01"
)
OTHER = VmId.parse(str(VM).replace("web-01", "web-02"))


@pytest.fixture
async def ledger(azurite: Any) -> AsyncIterator[Ledger]:
    table = TableClient.from_connection_string(azurite.connection_string, "ledger" + uuid.uuid4().hex[:12])
    async with Ledger(table, lease_s=60) as opened:
        await opened.create_table_if_needed()
        yield opened


async def _healthy(ledger: Ledger, vm: VmId) -> None:
    lease = await ledger.acquire(vm, owner="w1")
    assert lease is not None
    await ledger.release(lease, Outcome(str(vm), OutcomeKind.HEALTHY, "kms-client-licensed"))


async def test_a_vm_whose_verdict_a_pending_intent_overtook_is_not_recently_verified(ledger: Ledger) -> None:
    await _healthy(ledger, VM)
    await _healthy(ledger, OTHER)
    cutoff = datetime.now(UTC) - timedelta(hours=1)
    assert await ledger.verified_since(cutoff) == {VM, OTHER}
    # A later workflow announces a remediation of VM, then dies (no release, no verdict).
    lease = await ledger.acquire(VM, owner="w2", now=datetime.now(UTC) - timedelta(hours=2))
    assert lease is not None
    await ledger.renew(lease, intent={"phase": "remediate", "owner": "w2"})
    assert await ledger.verified_since(cutoff) == {OTHER}  # the sweep checks VM again
