"""Review of issue 9: tests for two guarantees no test of main pinned (each kills a surviving mutant).

- "A later holder that finds an intent still pending ... ignores the stored verdict, detects
  again" (docs/reliability.md, "Delivery guarantees"): the mutant that let ``recently-verified``
  answer from the stored verdict despite a pending intent survived every test, because no test had
  a fresh verdict *and* a dead workflow's intent on the same VM.
- "if the write still fails, no verdict is stored, the intent stays pending, and the invocation
  raises": the mutant that swallowed the failed history write (storing the verdict, deleting the
  message) survived, because the only test of it also fails the release (a whole Table outage),
  which raises anyway. Here only the outcome row is refused; the release still works.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from shared import triggers
from shared.intake import from_log_rows
from shared.ledger import STATE_PARTITION, Ledger, LedgerError, vm_key
from shared.model import VmId
from shared.settings import Settings
from simulator import Simulator
from tests.test_function_app import app_env, drain, history, queue_client, remediations, sim, vm_id
from tests.test_worker_delivery import item, newest, scripts, verdict, verified

__all__ = ["app_env", "sim"]


async def announce_and_die(env: dict[str, str], name: str) -> None:
    """What a worker killed after announcing a remediation leaves once its lease has run out."""
    settings = Settings.from_env(env)
    intent = {"phase": "remediate", "owner": "worker-dead", "correlationId": "dead-1"}
    async with TableClient.from_connection_string(env["AzureWebJobsStorage"], settings.ledger_table) as table:
        await table.update_entity(
            {
                "PartitionKey": STATE_PARTITION,
                "RowKey": vm_key(VmId.parse(vm_id(name))),
                "pendingIntent": json.dumps(intent),
                "pendingAt": datetime.now(UTC),
                "leaseOwner": "worker-dead",
                "leaseUntil": datetime.now(UTC) - timedelta(seconds=1),
            },
            mode=UpdateMode.MERGE,
        )


async def test_a_pending_intent_makes_an_older_log_row_run_in_full_despite_a_fresh_verdict(
    app_env: dict[str, str], sim: Simulator
) -> None:
    at = await verified(app_env, "web-01")  # remediated: a fresh verdict with its OS disk
    await announce_and_die(app_env, "web-01")
    row = {"_ResourceId": vm_id("web-01"), "Computer": "web-01", "LastSeen": at - timedelta(seconds=1)}
    result = from_log_rows([row], now=datetime.now(UTC), source="log-scan:test")
    async with queue_client(app_env) as queue:
        await queue.send_message(json.dumps(result.items[0].to_dict()))
    await drain(app_env)
    # Without the intent this row would be answered by the verdict (skipped: recently-verified).
    assert await newest(app_env, "web-01") == "healthy:kms-client-licensed"
    assert (await history(app_env, vm_id("web-01")))[0]["details"]["interrupted"]["owner"] == "worker-dead"
    assert scripts(sim, "web-01") == ["detect", "remediate", "detect"]


async def test_an_outcome_row_refused_while_the_release_works_stores_no_verdict_and_raises(
    app_env: dict[str, str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(self: Ledger, *args: Any, **kwargs: Any) -> None:
        raise LedgerError("ledger record failed: the outcome row was refused")

    monkeypatch.setattr(Ledger, "record", refused)  # intent rows and the release still work
    with pytest.raises(LedgerError):
        await triggers.work(item("web-01", "refused-1"))  # the host keeps the message
    assert remediations(sim, "web-01") == 1
    assert await verdict(app_env, "web-01") is None  # no verdict without its history row
    rows = await history(app_env, vm_id("web-01"))
    assert [(r["entry"], r["reason"]) for r in rows] == [("intent", "remediate:avma-channel")]
    settings = Settings.from_env(app_env)
    async with TableClient.from_connection_string(
        app_env["AzureWebJobsStorage"], settings.ledger_table
    ) as table:
        state = await table.get_entity(STATE_PARTITION, vm_key(VmId.parse(vm_id("web-01"))))
    assert json.loads(state["pendingIntent"])["phase"] == "remediate"  # the next holder detects again
    assert not state["leaseOwner"]  # the lease itself was released
