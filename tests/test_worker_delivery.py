"""Delivery guarantees of the queue worker under crashes and storage trouble (issue 9, items 1, 2, 5).

Against the real function code (``shared.triggers.work``), the simulator and Azurite. A "crash" is a
``BaseException`` raised right after a Run Command returned, with every later ledger call of that
process refused, as a killed worker makes none; a "Table outage" fails Table requests in the
ledger's own HTTP pipeline while the queue keeps working. "Time passes" is the lease's expiry
written into the state row, rather than a wait for a real lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import azure.functions as func
import pytest
from azure.core.exceptions import ServiceRequestError
from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from shared import triggers
from shared.azure.compute import ComputeGateway
from shared.intake import from_log_rows
from shared.ledger import STATE_PARTITION, Ledger, vm_key
from shared.model import VmId
from shared.settings import Settings
from simulator import Simulator
from tests.payloads import dim, v2_alert
from tests.test_function_app import (
    app_env,
    drain,
    history,
    licensed,
    queue_client,
    remediations,
    run_kinds,
    sim,
    user,
    vm_id,
)

__all__ = ["app_env", "sim"]  # fixtures shared with tests/test_function_app.py


class Killed(BaseException):
    """The worker process died (an out-of-memory kill, a host recycle): nothing after it runs."""


def is_remediation(body: Mapping[str, Any]) -> bool:
    return any("guest script: remediate" in line for line in body.get("script", []))


def item(name: str, correlation: str) -> str:
    return json.dumps(
        {
            "reason": "vm-created",
            "vmId": vm_id(name),
            "correlationId": correlation,
            "firstSeen": "2026-01-01T00:00:00+00:00",
        }
    )


async def expire_lease(env: dict[str, str], name: str) -> None:
    """Let the lease's time run out: the state row's ``leaseUntil`` moves into the past."""
    settings = Settings.from_env(env)
    key = vm_key(VmId.parse(vm_id(name)))
    async with TableClient.from_connection_string(env["AzureWebJobsStorage"], settings.ledger_table) as table:
        row = await table.get_entity(STATE_PARTITION, key)
        assert row["leaseOwner"], "the dead worker's lease should still be held"
        await table.update_entity(
            {
                "PartitionKey": STATE_PARTITION,
                "RowKey": key,
                "leaseUntil": datetime.now(UTC) - timedelta(seconds=1),
            },
            mode=UpdateMode.MERGE,
        )


async def verdict(env: dict[str, str], name: str) -> Any:
    async with Ledger.from_settings(Settings.from_env(env)) as ledger:
        return await ledger.last_verdict(VmId.parse(vm_id(name)))


async def wait_for_retry(env: dict[str, str]) -> list[dict[str, Any]]:
    """The re-enqueued delivery, once its delay is over (DEFER_DELAY_SECONDS=1)."""
    async with queue_client(env) as queue:
        assert await queue.peek_messages() == []  # invisible for its delay, but there
    for _ in range(30):
        await asyncio.sleep(0.2)
        async with queue_client(env) as queue:
            peeked = await queue.peek_messages(max_messages=5)
        if peeked:
            return [json.loads(m.content) for m in peeked]
    raise AssertionError("the delivery that met the lease was not re-enqueued")


@pytest.fixture
def crash_after_remediation(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """The first remediation Run Command completes on the VM, then its worker dies."""
    state = {"dead": False, "crashed": False}
    real_run, real_release, real_record = ComputeGateway.run_command, Ledger.release, Ledger.record

    async def run_command(self: ComputeGateway, vm: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        result = await real_run(self, vm, body)
        if is_remediation(body) and not state["crashed"]:
            state["dead"] = state["crashed"] = True
            raise Killed
        return result

    async def release(self: Ledger, *args: Any, **kwargs: Any) -> None:
        if state["dead"]:
            raise Killed
        await real_release(self, *args, **kwargs)

    async def record(self: Ledger, *args: Any, **kwargs: Any) -> None:
        if state["dead"]:
            raise Killed
        await real_record(self, *args, **kwargs)

    monkeypatch.setattr(ComputeGateway, "run_command", run_command)
    monkeypatch.setattr(Ledger, "release", release)
    monkeypatch.setattr(Ledger, "record", record)
    return state


async def test_a_worker_killed_after_its_remediation_post_leaves_evidence_and_the_redelivery_converges(
    app_env: dict[str, str], sim: Simulator, crash_after_remediation: dict[str, bool]
) -> None:
    body = item("web-01", "crash-1")
    with pytest.raises(Killed):
        await triggers.work(body)
    crash_after_remediation["dead"] = False  # the host redelivers to a new process
    assert remediations(sim, "web-01") == 1  # the VM was re-keyed ...
    rows = await history(app_env, vm_id("web-01"))
    # ... and the history says so, although the worker never recorded an outcome
    assert [(r["entry"], r["reason"]) for r in rows] == [("intent", "remediate:avma-channel")]

    # The redelivery meets the dead worker's live lease: not dropped as a duplicate, but retried.
    [outcome] = await triggers.work(body)
    assert (outcome.kind.value, outcome.reason) == ("deferred", "lease-held")
    [retry] = await wait_for_retry(app_env)
    assert (retry["vmId"], retry["correlationId"], retry["attempt"]) == (vm_id("web-01"), "crash-1", 0)
    assert (await history(app_env, vm_id("web-01")))[0]["reason"] == "lease-held"

    # While the lease lives the retry keeps coming back; once it expired, the workflow runs afresh.
    await expire_lease(app_env, "web-01")
    assert len(await drain(app_env)) == 1
    rows = await history(app_env, vm_id("web-01"))
    assert rows[0]["outcome"] == "healthy"
    assert rows[0]["details"]["interrupted"]["phase"] == "remediate"  # detection saw what the POST did
    stored = await verdict(app_env, "web-01")
    assert stored is not None and stored.outcome.value == "healthy"  # the VM's real state
    assert remediations(sim, "web-01") == 1  # never re-keyed twice


class TableOutage(SansIOHTTPPolicy[Any, Any]):
    """Fails Table requests (in the ledger's pipeline, before azure-core's retries) while on."""

    def __init__(self) -> None:
        self.planned = 0  # how many requests fail once the outage starts
        self.failures_left = 0
        self.failed = 0

    def on_request(self, request: PipelineRequest[Any]) -> None:
        if self.failures_left > 0:
            self.failures_left -= 1
            self.failed += 1
            raise ServiceRequestError("table storage unreachable (test outage)")


@pytest.fixture
def table_outage(monkeypatch: pytest.MonkeyPatch) -> TableOutage:
    """A Table outage that starts right after the first remediation Run Command completes."""
    outage = TableOutage()
    real_from_settings = Ledger.from_settings.__func__  # type: ignore[attr-defined]

    def from_settings(
        cls: type[Ledger], settings: Settings, credential: Any = None, **options: Any
    ) -> Ledger:
        return real_from_settings(cls, settings, credential, per_call_policies=[outage], **options)  # type: ignore[no-any-return]

    real_run = ComputeGateway.run_command
    started = {"done": False}

    async def run_command(self: ComputeGateway, vm: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        result = await real_run(self, vm, body)
        if is_remediation(body) and not started["done"]:
            started["done"] = True
            outage.failures_left = outage.planned
        return result

    monkeypatch.setattr(Ledger, "from_settings", classmethod(from_settings))
    monkeypatch.setattr(ComputeGateway, "run_command", run_command)
    monkeypatch.setattr(Ledger, "retry_backoff_s", 0.05, raising=False)
    return outage


async def test_a_short_table_outage_right_after_a_remediation_is_ridden_out_by_retrying_the_write(
    app_env: dict[str, str], sim: Simulator, table_outage: TableOutage
) -> None:
    table_outage.planned = 2  # the first two tries of the outcome row
    [outcome] = await triggers.work(item("web-01", "outage-1"))
    assert table_outage.failed == 2
    assert (outcome.kind.value, outcome.reason) == ("remediated", "avma-channel")
    rows = await history(app_env, vm_id("web-01"))
    assert [(r["outcome"], r["reason"]) for r in rows] == [
        ("remediated", "avma-channel"),
        ("intent", "remediate:avma-channel"),
    ]
    stored = await verdict(app_env, "web-01")
    assert stored is not None and stored.outcome.value == "remediated"


async def test_a_long_table_outage_after_a_remediation_logs_the_outcome_and_keeps_the_message(
    app_env: dict[str, str], sim: Simulator, table_outage: TableOutage, caplog: pytest.LogCaptureFixture
) -> None:
    """The ledger refuses the outcome row after its retries: the outcome is logged, and the item is
    carried on as a delayed copy (tests/test_worker_storage_outage.py: past the host's retries)."""
    table_outage.planned = 10**6  # for the rest of this invocation
    body = item("web-01", "outage-2")
    with caplog.at_level(logging.INFO, logger="avma_remediator.outcomes"):
        [carried] = await triggers.work(body)
    assert (carried.kind.value, carried.reason) == ("deferred", "ledger-unavailable")
    logged = [
        json.loads(r.getMessage().split(" ", 1)[1])
        for r in caplog.records
        if r.name == "avma_remediator.outcomes"
    ]
    assert [(o["outcome"], o["reason"], o["correlationId"]) for o in logged] == [
        ("remediated", "avma-channel", "outage-2"),
        ("deferred", "ledger-unavailable", "outage-2"),
    ]

    table_outage.failures_left = 0  # storage is back; the copy comes after its delay
    [copy] = await wait_for_retry(app_env)
    assert (copy["correlationId"], copy["ledgerMissed"]) == ("outage-2", 1)
    [outcome] = await drain_one(app_env)
    assert (outcome.kind.value, outcome.reason) == ("deferred", "lease-held")  # not `skipped: duplicate`
    await wait_for_retry(app_env)
    await expire_lease(app_env, "web-01")
    assert len(await drain(app_env)) == 1
    rows = await history(app_env, vm_id("web-01"))
    assert rows[0]["outcome"] == "healthy"
    assert rows[0]["details"]["interrupted"]["phase"] == "remediate"
    assert "intent" in [r["outcome"] for r in rows]  # written before the POST, before the outage
    assert remediations(sim, "web-01") == 1


async def drain_one(env: dict[str, str]) -> list[Any]:
    """Receive one visible message, run the worker on it, delete it: the worker's outcomes."""
    async with queue_client(env) as queue:
        [message] = [m async for m in queue.receive_messages(max_messages=1, visibility_timeout=60)]
        outcomes = await triggers.work(message.content)
        await queue.delete_message(message)
    return outcomes


async def test_a_lease_lost_before_the_remediation_post_sends_nothing(
    app_env: dict[str, str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease expired during detection and another worker took the VM: no remediation POST.

    On the two-step path (a VM whose edition ARM does not name); the one-step path's POST is the
    first, after the lease was renewed (tests/test_one_run_command.py)."""
    monkeypatch.setattr("shared.workflow.expectation_for", lambda vm, settings: None)
    settings = Settings.from_env(app_env)
    key = vm_key(VmId.parse(vm_id("web-01")))
    real_run = ComputeGateway.run_command

    async def run_command(self: ComputeGateway, vm: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        result = await real_run(self, vm, body)
        if not is_remediation(body):  # detection done; meanwhile the lease passes to another worker
            async with TableClient.from_connection_string(
                app_env["AzureWebJobsStorage"], settings.ledger_table
            ) as table:
                await table.update_entity(
                    {
                        "PartitionKey": STATE_PARTITION,
                        "RowKey": key,
                        "leaseOwner": "worker-other",
                        "leaseToken": "other",
                        "leaseUntil": datetime.now(UTC) + timedelta(minutes=30),
                    },
                    mode=UpdateMode.MERGE,
                )
        return result

    monkeypatch.setattr(ComputeGateway, "run_command", run_command)
    [outcome] = await triggers.work(item("web-01", "lost-1"))
    assert (outcome.kind.value, outcome.reason) == ("deferred", "lease-lost")
    assert [e["script"] for e in sim.run_log(vm_id("web-01"))] == ["detect"]  # nothing POSTed after
    rows = await history(app_env, vm_id("web-01"))
    assert [(r["outcome"], r["reason"]) for r in rows] == [("deferred", "lease-lost")]
    [retry] = await wait_for_retry(app_env)
    assert retry["correlationId"] == "lost-1"


async def test_a_vm_read_that_never_answers_ends_at_its_deadline(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ARM accepts the connection and never answers: the read ends at ARM_CALL_TIMEOUT_SECONDS."""
    from shared.azure.compute import ComputeError
    from shared.azure.credentials import make_credential

    held: list[asyncio.StreamWriter] = []

    async def tarpit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never a byte back, not even the TLS handshake

    server = await asyncio.start_server(tarpit, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    env = {**app_env, "ARM_ENDPOINT": f"https://127.0.0.1:{port}", "ARM_CALL_TIMEOUT_SECONDS": "0.5"}
    settings = Settings.from_env(env)
    credential = make_credential(settings, env)
    try:
        async with ComputeGateway(credential, settings) as gateway:
            started = asyncio.get_running_loop().time()
            with pytest.raises(ComputeError) as raised:
                await asyncio.wait_for(gateway.get_vm(VmId.parse(vm_id("web-01"))), 10)
            elapsed = asyncio.get_running_loop().time() - started
        assert raised.value.reason == "arm-timeout"
        assert elapsed < 5
    finally:
        await credential.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


# --- issue 9: evidence newer than the verdict ----------------------------------------------------


async def verified(env: dict[str, str], name: str) -> datetime:
    """Fix the VM through a manual item; the moment its verdict was reached."""
    async with queue_client(env) as queue:
        await queue.send_message(json.dumps({"reason": "manual", "vmId": vm_id(name), "correlationId": "m"}))
    await drain(env)
    stored = await verdict(env, name)
    assert stored is not None and stored.outcome.value == "remediated" and stored.verified_at is not None
    return stored.verified_at  # type: ignore[no-any-return]


def scripts(sim: Simulator, name: str) -> list[str]:
    """The VM's Run Commands: ``rekey-if`` is the first Run Command of a VM whose edition ARM names
    (issue 12), which re-keys an AVMA guest that shows those facts and only reads any other."""
    return run_kinds(sim, name)


async def newest(env: dict[str, str], name: str) -> str:
    row = (await history(env, vm_id(name)))[0]
    return f"{row['outcome']}:{row['reason']}"


@pytest.mark.parametrize(
    ("offset_s", "expected", "runs"),
    [
        (-1.0, "skipped:recently-verified", ["rekey-if"]),
        (1.0, "healthy:kms-client-licensed", ["rekey-if", "rekey-if"]),
    ],
)
async def test_a_log_row_timed_after_the_verdict_runs_in_full_and_one_timed_before_it_does_not(
    app_env: dict[str, str], sim: Simulator, offset_s: float, expected: str, runs: list[str]
) -> None:
    at = await verified(app_env, "web-01")
    row = {"_ResourceId": vm_id("web-01"), "Computer": "web-01", "LastSeen": at + timedelta(seconds=offset_s)}
    # Intake runs later than the row was logged: firstSeen is after the verdict either way.
    result = from_log_rows([row], now=datetime.now(UTC) + timedelta(seconds=2), source="log-scan:test")
    async with queue_client(app_env) as queue:
        await queue.send_message(json.dumps(result.items[0].to_dict()))
    await drain(app_env)
    assert await newest(app_env, "web-01") == expected
    assert scripts(sim, "web-01") == runs


@pytest.mark.parametrize(
    ("offset_s", "expected", "runs"),
    [
        (-1.0, "skipped:recently-verified", ["rekey-if"]),
        (1.0, "healthy:kms-client-licensed", ["rekey-if", "rekey-if"]),
    ],
)
async def test_an_alert_fired_after_the_verdict_runs_in_full_and_a_repeat_of_an_older_one_does_not(
    app_env: dict[str, str], sim: Simulator, offset_s: float, expected: str, runs: list[str]
) -> None:
    at = await verified(app_env, "app-02")
    alert = v2_alert(dimensions=[dim("_ResourceId", vm_id("app-02"))])
    alert["data"]["essentials"]["firedDateTime"] = (at + timedelta(seconds=offset_s)).isoformat()
    await asyncio.sleep(max(offset_s, 0) + 1.1)  # delivered a second or more after the verdict
    response = await user("alert_webhook")(
        func.HttpRequest(method="POST", url="/api/alerts", body=json.dumps(alert).encode())
    )
    assert response.status_code == 202
    await drain(app_env)
    assert await newest(app_env, "app-02") == expected
    assert scripts(sim, "app-02") == runs


# --- issue 9: a VM write is evidence only when the OS disk changed -------------------------------


@pytest.mark.parametrize("swap", [False, True])
async def test_a_vm_write_after_a_fresh_verdict_runs_in_full_only_after_an_os_disk_swap(
    app_env: dict[str, str], sim: Simulator, swap: bool
) -> None:
    from tests.test_function_app import event_grid_event

    await user("vm_write_event")(event_grid_event(vm_id("web-01"), event_id="first-write"))
    await drain(app_env)
    fixed = await verdict(app_env, "web-01")
    assert fixed is not None and fixed.outcome.value == "remediated" and fixed.os_disk_id
    await asyncio.sleep(1.1)  # the next write comes a second or more after the verdict
    if swap:
        new_disk = sim.swap_os_disk(vm_id("web-01"))  # re-imaged: the guest is on AVMA again
        assert new_disk.lower() != fixed.os_disk_id.lower() and new_disk.endswith(
            "_OsDisk_2_" + new_disk[-32:]
        )
    await user("vm_write_event")(
        event_grid_event(vm_id("web-01"), event_id="second-write")
    )  # a tag, a resize
    await drain(app_env)
    if swap:
        assert await newest(app_env, "web-01") == "remediated:avma-channel"
        assert scripts(sim, "web-01") == ["rekey-if", "rekey-if"]
        again = await verdict(app_env, "web-01")
        assert again is not None and again.os_disk_id.lower() == new_disk.lower()
    else:
        # the fresh verdict answers it: the VM is read, no Run Command holds its slot
        assert await newest(app_env, "web-01") == "skipped:recently-verified"
        assert scripts(sim, "web-01") == ["rekey-if"]


# --- issue 9, item 7: a Run Command answer that says nothing about the VM is not terminal ----------


def fresh_item(name: str, correlation: str, **extra: Any) -> str:
    now = datetime.now(UTC).isoformat()
    return json.dumps(
        {"reason": "vm-created", "vmId": vm_id(name), "correlationId": correlation, "firstSeen": now, **extra}
    )


async def test_an_unreadable_remediation_answer_is_deferred_and_the_retry_detects_before_anything_else(
    app_env: dict[str, str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The remediation POST was accepted and ran, but its output has no readable result line: what
    it did is unknown. Deferred (not failed), re-enqueued with the count of unreadable answers; the
    retry detects the VM's new state and records it, and never sends the remediation again."""
    real_run = ComputeGateway.run_command

    async def cut_remediation(self: ComputeGateway, vm: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        out, err = await real_run(self, vm, body)
        return (out[:40], err) if is_remediation(body) else (out, err)

    monkeypatch.setattr(ComputeGateway, "run_command", cut_remediation)
    [outcome] = await triggers.work(fresh_item("web-01", "cut-1"))
    assert (outcome.kind.value, outcome.reason, outcome.details["phase"]) == (
        "deferred",
        "bad-output",
        "remediate",
    )
    assert outcome.details["error"] and outcome.details["nextAttempt"] == 1
    rows = await history(app_env, vm_id("web-01"))
    assert [(r["entry"], r["outcome"], r["reason"]) for r in rows] == [
        ("outcome", "deferred", "bad-output"),
        ("intent", "intent", "remediate:avma-channel"),
    ]
    stored = await verdict(app_env, "web-01")
    assert stored is not None and (stored.outcome.value, stored.reason) == ("deferred", "bad-output")
    [retry] = await wait_for_retry(app_env)
    assert (retry["correlationId"], retry["attempt"], retry["unreadable"]) == ("cut-1", 1, 1)
    await drain(app_env)
    # the first Run Command was the conditional re-key (issue 12), whose answer was cut: what it did
    # is unknown, so the retry detects first and never sends a key again
    assert scripts(sim, "web-01") == ["rekey-if", "detect"]
    stored = await verdict(app_env, "web-01")
    assert stored is not None and (stored.outcome.value, stored.reason) == ("healthy", "kms-client-licensed")
    assert licensed(sim, "web-01")


@pytest.mark.parametrize("reason", ["run-command-failed", "bad-output"])
async def test_an_unreadable_answer_is_retried_and_terminal_only_on_the_items_fourth(
    reason: str, app_env: dict[str, str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.azure.compute import RunCommandOperationFailed
    from shared.unreadable import MAX_UNREADABLE_TRIES
    from shared.workqueue import WorkQueue

    assert MAX_UNREADABLE_TRIES == 4
    commands: list[str] = []

    async def unreadable(self: ComputeGateway, vm: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        commands.append(str(vm))
        if reason == "run-command-failed":
            raise RunCommandOperationFailed(
                "An internal execution error occurred.", code="InternalExecutionError", status=200
            )
        return 'AVMA-REMEDIATOR-RESULT {"schema":2,"scr', ""

    sent: list[tuple[dict[str, Any], float]] = []
    real_send = WorkQueue.send

    async def send(self: WorkQueue, item: Any, *, delay_s: float = 0.0) -> None:
        sent.append((item.to_dict(), delay_s))
        await real_send(self, item, delay_s=delay_s)

    monkeypatch.setattr(ComputeGateway, "run_command", unreadable)
    monkeypatch.setattr(WorkQueue, "send", send)
    # The third unreadable answer of an item: deferred again, the count carried by the retry.
    [third] = await triggers.work(fresh_item("app-02", "u-3", attempt=2, unreadable=2))
    assert (third.kind.value, third.reason) == ("deferred", reason)
    [(retry, delay)] = sent
    assert (retry["attempt"], retry["unreadable"], delay) == (3, 3, 4.0)
    # The fourth: terminal, with the same reason, the number of tries and what to look at.
    [fourth] = await triggers.work(json.dumps(retry))
    assert (fourth.kind.value, fourth.reason, fourth.details["tries"]) == ("failed", reason, 4)
    assert "4 tries" in fourth.hint and len(sent) == 1  # nothing re-enqueued
    stored = await verdict(app_env, "app-02")
    assert stored is not None and (stored.outcome.value, stored.reason) == ("failed", reason)
    assert len(commands) == 2  # one detection each; nothing after an unreadable answer


# --- the deferral deadline counts retrying, not waiting; the retries cover the whole window ------


async def test_an_item_that_waited_out_the_deadline_in_a_backlog_still_gets_its_retries(
    app_env: dict[str, str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item produced two days ago (a queue backlog, a storage outage) meets a busy VM on its
    first try: deferred, never failed at once. DEFER_DEADLINE_HOURS counts the retry delays the
    engine scheduled (``deferredS``), not the time the item or its retries waited in the queue."""
    from shared.workqueue import WorkQueue

    sent: list[tuple[dict[str, Any], float]] = []
    real_send = WorkQueue.send

    async def send(self: WorkQueue, item: Any, *, delay_s: float = 0.0) -> None:
        sent.append((item.to_dict(), delay_s))
        await real_send(self, item, delay_s=delay_s)

    monkeypatch.setattr(WorkQueue, "send", send)
    old = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    [first] = await triggers.work(fresh_item("busy-04", "backlog-1", firstSeen=old))
    assert (first.kind.value, first.reason) == ("deferred", "run-command-busy"), first
    [(retry, delay)] = sent
    assert retry["firstSeen"] == old  # when it appeared is kept; the deadline counts the delays
    assert (retry["attempt"], retry["deferredS"], delay) == (1, 1.0, 1.0)
    # A retry that came back long after its delay (a backlog) has still been deferred only that long.
    [second] = await triggers.work(json.dumps(retry))
    assert (second.kind.value, second.reason) == ("deferred", "run-command-busy")
    assert sent[-1][0]["deferredS"] == 3.0  # 1 s + 2 s
    # Deferred for the deadline (24 h of delays): now it ends, saying how long.
    retry["deferredS"] = 24 * 3600.0
    [last] = await triggers.work(json.dumps(retry))
    assert (last.kind.value, last.reason) == ("failed", "deadline-exceeded:run-command-busy")
    assert last.details["deferredS"] == 24 * 3600.0 and len(sent) == 2


async def test_no_retry_waits_longer_than_a_sixteenth_of_the_deadline(
    app_env: dict[str, str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The doubling delay alone leaves the deadline's window with few looks, the last ones far
    apart; capped at 1/16 of DEFER_DEADLINE_HOURS, a late retry comes back within that share."""
    from shared.workqueue import WorkQueue

    monkeypatch.setenv("DEFER_DEADLINE_HOURS", "1")
    delays: list[float] = []
    real_send = WorkQueue.send

    async def send(self: WorkQueue, item: Any, *, delay_s: float = 0.0) -> None:
        delays.append(delay_s)
        await real_send(self, item, delay_s=delay_s)

    monkeypatch.setattr(WorkQueue, "send", send)
    for attempt in (0, 3, 10):  # 1 s x 2^attempt: 1, 8, 1024 s
        [outcome] = await triggers.work(fresh_item("busy-04", f"late-{attempt}", attempt=attempt))
        assert (outcome.kind.value, outcome.reason) == ("deferred", "run-command-busy")
    assert delays == [1.0, 8.0, 3600 / 16]


async def test_a_retry_of_an_item_at_the_attempt_cap_is_sent_with_the_attempt_it_is_read_back_with(
    app_env: dict[str, str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item at ``MAX_ATTEMPT`` (a forged or clamped one) is deferred and retried, since the
    deadline counts scheduled delays: its retry carries ``MAX_ATTEMPT`` again, not one more, which
    every reader would clamp (the chaos run's producer-side audit found the retry of a clamped
    ``attempt`` never answered under the attempt it was sent with)."""
    from shared.model import MAX_ATTEMPT
    from shared.workqueue import WorkQueue

    sent: list[dict[str, Any]] = []
    real_send = WorkQueue.send

    async def send(self: WorkQueue, item: Any, *, delay_s: float = 0.0) -> None:
        sent.append(item.to_dict())
        await real_send(self, item, delay_s=delay_s)

    monkeypatch.setattr(WorkQueue, "send", send)
    [outcome] = await triggers.work(fresh_item("busy-04", "cap-1", attempt=MAX_ATTEMPT * 1000))
    assert (outcome.kind.value, outcome.reason) == ("deferred", "run-command-busy")
    assert outcome.details["nextAttempt"] == MAX_ATTEMPT
    [retry] = sent
    assert retry["attempt"] == MAX_ATTEMPT
    [row] = [r for r in await history(app_env, vm_id("busy-04")) if r["entry"] == "outcome"]
    assert row["attempt"] == MAX_ATTEMPT  # recorded under the attempt it was read with


async def test_a_throttled_vm_is_retried_no_sooner_than_arms_retry_after(
    app_env: dict[str, str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ARM answered 429 with ``Retry-After: 120`` past azure-core's own retries: the item is
    re-enqueued 120 s out, not after the usual 1 s (DEFER_DELAY_SECONDS × 2^attempt here), which
    ARM would refuse again (request-limits-and-throttling.md); the wait counts toward the deadline."""
    from shared.azure.compute import Throttled
    from shared.workqueue import WorkQueue

    async def throttled(self: ComputeGateway, vm: VmId) -> Any:
        raise Throttled("throttled", code="SubscriptionRequestsThrottled", status=429, retry_after_s=120.0)

    sent: list[tuple[dict[str, Any], float]] = []
    real_send = WorkQueue.send

    async def send(self: WorkQueue, item: Any, *, delay_s: float = 0.0) -> None:
        sent.append((item.to_dict(), delay_s))
        await real_send(self, item, delay_s=delay_s)

    monkeypatch.setattr(ComputeGateway, "get_vm", throttled)
    monkeypatch.setattr(WorkQueue, "send", send)
    [outcome] = await triggers.work(fresh_item("web-01", "throttled-1"))
    assert (outcome.kind.value, outcome.reason) == ("deferred", "throttled")
    assert (outcome.details["retryAfterS"], outcome.details["retryInS"]) == (120.0, 120.0)
    [(retry, delay)] = sent
    assert (delay, retry["deferredS"]) == (120.0, 120.0)
