"""Review of issue 9: tests for guarantees no test of main pinned (each kills a mutant that survived).

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
    # One conditional re-key for the remediation (issue 12: ARM named the edition), then one more
    # Run Command for the log row: the verdict did not answer it (its facts no longer match: no change).
    assert scripts(sim, "web-01") == ["rekey-if", "rekey-if"]


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


# --- "recently-verified" only for a good verdict younger than RECHECK_AFTER_HOURS -----------------
# Two more mutants survived main's suite: recently-verified trusting a verdict of any age, and
# trusting a verdict that was not healthy/remediated (docs/reliability.md, "Repeated events do not
# repeat detection": "older than a healthy/remediated verdict younger than RECHECK_AFTER_HOURS").


class _Lease:
    interrupted = None

    def __init__(self, previous: Any) -> None:
        self.previous = previous


class _Ledger:
    def __init__(self, previous: Any) -> None:
        self.previous = previous

    async def acquire(self, vm_id: VmId, *, owner: str, now: datetime | None = None) -> Any:
        return _Lease(self.previous)

    async def release(self, lease: Any, outcome: Any) -> None:
        return None

    async def record(self, vm_id: VmId, **kwargs: Any) -> None:
        return None


class _Seen:
    def __init__(self) -> None:
        self.recent: list[Any] = []

    async def check(self, vm_id: VmId, *, before_run_command: Any = None, recent: Any = None) -> Any:
        from shared.model import Outcome, OutcomeKind

        self.recent.append(recent)
        return Outcome(str(vm_id), OutcomeKind.HEALTHY, "kms-client-licensed")


@pytest.mark.parametrize(
    ("outcome", "age_h", "trusted"),
    [("healthy", 1, True), ("remediated", 1, True), ("healthy", 25, False), ("failed", 1, False)],
)
async def test_only_a_fresh_good_verdict_answers_an_older_alert(
    outcome: str, age_h: float, trusted: bool
) -> None:
    from shared.ledger import Verdict
    from shared.model import OutcomeKind, Trigger, WorkItem
    from shared.worker import Worker

    now = datetime.now(UTC)
    verified_at = now - timedelta(hours=age_h)
    previous = Verdict(
        vm_id("web-01"), OutcomeKind(outcome), "r", "", verified_at, verified_at, 1, 0, 0, os_disk_id="disk-1"
    )
    seen = _Seen()
    worker = Worker(
        remediator=seen,
        ledger=_Ledger(previous),  # type: ignore[arg-type]
        queue=None,  # type: ignore[arg-type]
        resolver=None,  # type: ignore[arg-type]
        settings=Settings.from_env({}),  # RECHECK_AFTER_HOURS=24
    )
    fired = (verified_at - timedelta(minutes=5)).isoformat()
    item = WorkItem(Trigger.ALERT, vm_id=VmId.parse(vm_id("web-01")), first_seen=fired, evidence_at=fired)
    await worker.handle(item, now=now)
    assert (seen.recent[0] is not None) is trusted


async def test_resource_graph_unreachable_is_transient_not_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused connection to Resource Graph says nothing about the name: InventoryUnavailable."""
    import functools
    import socket

    from shared.azure import inventory
    from shared.azure.transient import TransientError

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fast = functools.partial(inventory.BoundedRetryPolicy, retry_total=0)
    monkeypatch.setattr(inventory, "BoundedRetryPolicy", fast)
    env = {"ARM_ENDPOINT": f"https://127.0.0.1:{port}", "AZURE_CLIENT_ID": "", "IDENTITY_ENDPOINT": ""}
    settings = Settings.from_env(env)

    class _Token:
        async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            from azure.core.credentials import AccessToken

            return AccessToken("t", 2**31)

        async def close(self) -> None:
            return None

    async with inventory.Inventory(_Token(), settings) as inv:  # type: ignore[arg-type]
        with pytest.raises(TransientError):
            await inv.resolve_computer("db-03")
