"""The Functions app through its real decorator metadata, with real trigger objects built from the
public samples, end to end: trigger → Azurite queue → worker → simulator VM → ledger (Azurite)."""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import functools
import json
import os
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from azure.functions.eventgrid import EventGridEventInConverter
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest
from azure.storage.queue import TextBase64DecodePolicy, TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient

import function_app
from shared.ledger import Ledger
from shared.model import VmId
from shared.settings import POISON_QUEUE, WORK_QUEUE, Settings
from simulator import Estate, Simulator
from tests.estates import windows_vm
from tests.payloads import CE_WRITE, EG_WRITE, as_cloud_event, as_vm_write, dim, load, v2_alert

ROOT = Path(__file__).resolve().parent.parent
SUB = "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7"


def vm_id(name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/rg-apps/providers/Microsoft.Compute/virtualMachines/{name}"


def avma(name: str, **extra: Any) -> dict[str, Any]:
    return windows_vm(vm_id(name), **extra)


ESTATE = [
    avma("web-01"),
    avma("app-02"),
    avma("db-03", computerName="DB-03", logResourceId=False),
    avma("busy-04", busySeconds=3600),
    avma("noagent-05", agentReady=False),
    {"id": vm_id("lnx-06"), "os": "Linux", "powerState": "running", "agentReady": True, "tags": {}},
]


@functools.cache
def functions() -> dict[str, Any]:
    # get_functions() may be called only once per FunctionApp
    return {f.get_function_name(): f for f in function_app.app.get_functions()}


def bindings(name: str) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in json.loads(functions()[name].get_function_json())["bindings"]}


def user(name: str) -> Any:
    return functions()[name].get_user_function()


# --- metadata -----------------------------------------------------------------------------------


def test_every_function_and_its_trigger() -> None:
    assert set(functions()) == {
        "vm_write_event",
        "alert_webhook",
        "log_scan",
        "sweep",
        "vm_check",
        "vm_check_poison",
        "status",
    }
    assert bindings("vm_write_event")["event"]["type"] == "eventGridTrigger"
    alert = bindings("alert_webhook")["req"]
    assert (alert["type"], alert["route"], alert["methods"], alert["authLevel"]) == (
        "httpTrigger",
        "alerts",
        ["POST"],
        "FUNCTION",
    )
    status = bindings("status")["req"]
    assert (status["route"], status["methods"], status["authLevel"]) == ("status", ["GET"], "FUNCTION")
    # schedules come from app settings, never hard-coded
    assert bindings("log_scan")["timer"]["schedule"] == "%LOG_SCAN_SCHEDULE%"
    assert bindings("sweep")["timer"]["schedule"] == "%SWEEP_SCHEDULE%"
    assert bindings("log_scan")["timer"]["runOnStartup"] is False
    worker = bindings("vm_check")["msg"]
    poison = bindings("vm_check_poison")["msg"]
    assert (worker["type"], worker["queueName"], worker["connection"]) == (
        "queueTrigger",
        WORK_QUEUE,
        "AzureWebJobsStorage",
    )
    assert (poison["queueName"], poison["connection"]) == (POISON_QUEUE, "AzureWebJobsStorage")
    assert POISON_QUEUE == WORK_QUEUE + "-poison"  # the host's poison-queue naming convention


def test_host_json_retries_and_timeouts_fit_the_workflow() -> None:
    host = json.loads((ROOT / "host.json").read_text())
    queues = host["extensions"]["queues"]
    assert queues["maxDequeueCount"] >= 3
    timeout = dt.timedelta(
        **dict(
            zip(("hours", "minutes", "seconds"), map(int, host["functionTimeout"].split(":")), strict=True)
        )
    )
    default = Settings.from_env({})
    # one work item may run two Run Commands, each up to RUN_COMMAND_TIMEOUT_SECONDS
    assert timeout.total_seconds() > 2 * default.run_command_timeout_s
    assert host["extensionBundle"]["id"] == "Microsoft.Azure.Functions.ExtensionBundle"


def test_engine_never_imports_azure_functions() -> None:
    offenders = []
    for path in (ROOT / "shared").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "azure.functions" or n.startswith("azure.functions.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


# --- the running app against the simulator and Azurite -----------------------------------------


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(Estate.from_dict({"vms": ESTATE}), latency_s=0.02) as running:
        yield running


@pytest.fixture
async def app_env(sim: Simulator, azurite: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The app settings a Functions host would have: simulator endpoints, Azurite, enforce mode."""
    env = {
        **sim.env(),
        "AzureWebJobsStorage": azurite.connection_string,
        "REMEDIATION_MODE": "enforce",
        "LEDGER_TABLE": "ledger" + uuid.uuid4().hex[:12],
        "DEFER_DELAY_SECONDS": "1",
        "LOG_SCAN_SCHEDULE": "0 */15 * * * *",
        "SWEEP_SCHEDULE": "0 0 */6 * * *",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for name in (WORK_QUEUE, POISON_QUEUE):
        async with QueueClient.from_connection_string(azurite.connection_string, name) as queue:
            try:
                await queue.create_queue()
            except Exception:  # already there from an earlier test: empty it
                await queue.clear_messages()
    return env


def queue_client(env: dict[str, str], name: str = WORK_QUEUE) -> QueueClient:
    return QueueClient.from_connection_string(
        env["AzureWebJobsStorage"],
        name,
        message_encode_policy=TextBase64EncodePolicy(),
        message_decode_policy=TextBase64DecodePolicy(),
    )


async def drain(env: dict[str, str], *, parallel: bool = False, rounds: int = 5) -> list[dict[str, Any]]:
    """Act as the Functions host: receive visible messages, run ``vm_check`` on each, delete on success."""
    handled: list[dict[str, Any]] = []
    async with queue_client(env) as queue:
        for _ in range(rounds):
            received = [m async for m in queue.receive_messages(max_messages=32, visibility_timeout=60)]
            if not received:
                break

            async def run(message: Any) -> None:
                trigger_message = QueueMessage(
                    id=message.id, body=message.content.encode(), dequeue_count=message.dequeue_count
                )
                await user("vm_check")(trigger_message)
                await queue.delete_message(message)
                handled.append(json.loads(message.content))

            if parallel:
                await asyncio.gather(*(run(m) for m in received))
            else:
                for message in received:
                    await run(message)
    return handled


async def history(env: dict[str, str], target: str) -> list[dict[str, Any]]:
    async with Ledger.from_settings(Settings.from_env(env)) as ledger:
        return await ledger.history(VmId.parse(target) if target.startswith("/") else target)


def remediations(sim: Simulator, name: str) -> int:
    return sum(1 for entry in sim.run_log(vm_id(name)) if entry["script"] == "remediate")


def licensed(sim: Simulator, name: str) -> bool:
    state = next(v for k, v in sim.state_dump().items() if k.lower() == vm_id(name).lower())
    return bool(state["channel"] == "KMS_CLIENT" and state["licenseStatus"] == 1)


def event_grid_event(resource: str, *, event_id: str | None = None) -> func.EventGridEvent:
    sample = as_vm_write(load(EG_WRITE), resource)
    return func.EventGridEvent(
        id=event_id or sample["id"],
        data=sample["data"],
        topic=sample["topic"],
        subject=sample["subject"],
        event_type=sample["eventType"],
        event_time=dt.datetime.fromisoformat(sample["eventTime"].replace("Z", "+00:00")[:26] + "+00:00"),
        data_version=sample["dataVersion"],
    )


async def test_vm_created_event_to_queue_to_worker_to_a_licensed_vm_and_a_ledger_row(
    app_env: dict[str, str], sim: Simulator
) -> None:
    await user("vm_write_event")(event_grid_event(vm_id("web-01")))
    async with queue_client(app_env) as queue:
        peeked = await queue.peek_messages(max_messages=5)
    assert [json.loads(m.content)["vmId"] for m in peeked] == [vm_id("web-01")]
    assert json.loads(peeked[0].content)["reason"] == "vm-created"

    assert len(await drain(app_env)) == 1
    assert licensed(sim, "web-01")
    rows = await history(app_env, vm_id("web-01"))
    # newest first: the outcome, and before it the intent written before the remediation POST
    assert [(r["outcome"], r["reason"], r["trigger"]) for r in rows] == [
        ("remediated", "avma-channel", "vm-created"),
        ("intent", "remediate:avma-channel", "vm-created"),
    ]
    assert rows[0]["correlationId"]
    assert rows[1]["entry"] == "intent" and rows[1]["correlationId"] == rows[0]["correlationId"]


async def test_cloud_events_schema_is_accepted_too(app_env: dict[str, str], sim: Simulator) -> None:
    cloud = as_cloud_event(as_vm_write(load(EG_WRITE), vm_id("app-02")))
    from shared import triggers

    result = await triggers.on_vm_event(cloud)
    assert [i.target for i in result.items] == [vm_id("app-02")]
    await drain(app_env)
    assert licensed(sim, "app-02")


def delivered(body: dict[str, Any]) -> Any:
    """The object the Python worker hands the function: its own converter decoding the JSON body."""
    from azure.functions import meta
    from azure.functions.eventgrid import EventGridEventInConverter

    datum = meta.Datum(type="json", value=json.dumps(body))
    return EventGridEventInConverter.decode(datum, trigger_metadata={})


async def test_a_cloud_events_delivery_through_the_real_adapter_reaches_the_vm(
    app_env: dict[str, str], sim: Simulator
) -> None:
    """A CloudEvents 1.0 subscription: the worker passes a func.CloudEvent (it has no ``topic``)."""
    sample = as_vm_write(load(CE_WRITE), vm_id("app-02"))
    sample["source"] = f"/subscriptions/{SUB}"
    event = delivered(sample)
    assert isinstance(event, func.CloudEvent)
    assert EventGridEventInConverter.check_input_type_annotation(
        typing.get_type_hints(user("vm_write_event"))["event"]
    )  # the annotation stays one the worker accepts
    await user("vm_write_event")(event)
    async with queue_client(app_env) as queue:
        peeked = await queue.peek_messages(max_messages=5)
    assert [json.loads(m.content)["vmId"] for m in peeked] == [vm_id("app-02")]
    await drain(app_env)
    assert licensed(sim, "app-02")


async def test_an_event_grid_schema_delivery_through_the_real_converter_still_works(
    app_env: dict[str, str], sim: Simulator
) -> None:
    event = delivered(as_vm_write(load(EG_WRITE), vm_id("web-01")))
    assert isinstance(event, func.EventGridEvent)
    await user("vm_write_event")(event)
    await drain(app_env)
    assert licensed(sim, "web-01")


async def test_alert_webhook_to_a_licensed_vm(app_env: dict[str, str], sim: Simulator) -> None:
    alert = v2_alert(dimensions=[dim("_ResourceId", vm_id("app-02").lower())], targets=[vm_id("app-02")])
    request = func.HttpRequest(method="POST", url="/api/alerts", body=json.dumps(alert).encode())
    response = await user("alert_webhook")(request)
    assert response.status_code == 202
    body = json.loads(response.get_body())
    assert [i["vmId"].lower() for i in body["items"]] == [vm_id("app-02").lower()]  # deduped across fields
    await drain(app_env)
    assert licensed(sim, "app-02")
    rows = await history(app_env, vm_id("app-02"))
    assert rows[0]["trigger"] == "alert"


async def test_alert_with_only_a_computer_name_is_resolved_through_the_inventory(
    app_env: dict[str, str], sim: Simulator
) -> None:
    alert = v2_alert(dimensions=[dim("Computer", "DB-03")], targets=[])
    response = await user("alert_webhook")(
        func.HttpRequest(method="POST", url="/api/alerts", body=json.dumps(alert).encode())
    )
    assert json.loads(response.get_body())["items"][0]["computer"] == "DB-03"
    await drain(app_env)  # resolves DB-03 to the VM, re-enqueues it by id, then checks it
    assert licensed(sim, "db-03")


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not JSON"),
        (json.dumps({"schemaId": "azureMonitorCommonAlertSchema"}).encode(), 400, "malformed alert"),
        (b" " * (256 * 1024 + 1), 413, "exceeds"),
    ],
)
async def test_alert_webhook_rejects_bad_bodies_clearly(
    app_env: dict[str, str], body: bytes, status: int, message: str
) -> None:
    response = await user("alert_webhook")(func.HttpRequest(method="POST", url="/api/alerts", body=body))
    assert response.status_code == status
    assert message in json.loads(response.get_body())["error"]
    async with queue_client(app_env) as queue:
        assert await queue.peek_messages() == []


async def test_resolved_alert_enqueues_nothing(app_env: dict[str, str]) -> None:
    alert = v2_alert(dimensions=[dim("_ResourceId", vm_id("web-01"))], condition="Resolved")
    response = await user("alert_webhook")(
        func.HttpRequest(method="POST", url="/api/alerts", body=json.dumps(alert).encode())
    )
    assert response.status_code == 202
    assert json.loads(response.get_body())["accepted"] == 0


async def test_log_scan_timer_finds_the_avma_vms_and_the_worker_fixes_them(
    app_env: dict[str, str], sim: Simulator
) -> None:
    await user("log_scan")(TimerRequest(past_due=False))
    async with queue_client(app_env) as queue:
        queued = [
            json.loads(m.content) async for m in queue.receive_messages(max_messages=32, visibility_timeout=1)
        ]
    targets = {m.get("vmId", "").lower() or m["computer"].lower() for m in queued}
    assert {vm_id("web-01").lower(), vm_id("app-02").lower(), "db-03"} <= targets
    assert all(m["reason"] == "log-scan" for m in queued)
    await asyncio.sleep(1.1)
    await drain(app_env)
    assert licensed(sim, "web-01") and licensed(sim, "app-02") and licensed(sim, "db-03")
    async with Ledger.from_settings(Settings.from_env(app_env)) as ledger:
        assert await ledger.get_marker("log-scan") is not None


async def test_ten_duplicate_deliveries_cause_exactly_one_remediation(
    app_env: dict[str, str], sim: Simulator
) -> None:
    event = event_grid_event(vm_id("web-01"))
    for _ in range(10):
        await user("vm_write_event")(event)
    handled = await drain(app_env, parallel=True)
    assert len(handled) == 10
    assert remediations(sim, "web-01") == 1
    assert sim.max_concurrent_run_commands() <= 1
    conflicts = {k.lower(): v for k, v in sim.counters()["conflicts"].items()}
    assert vm_id("web-01").lower() not in conflicts  # the lease kept Run Commands apart
    rows = await history(app_env, vm_id("web-01"))
    outcomes = [r["outcome"] + ":" + r["reason"] for r in rows]
    assert outcomes.count("remediated:avma-channel") == 1
    # the nine that met the lease are not dropped: each is recorded and comes back after a delay
    assert outcomes.count("deferred:lease-held") == 9
    await asyncio.sleep(2.1)  # DEFER_DELAY_SECONDS, with up to as much again of jitter
    assert len(await drain(app_env)) == 9  # one at a time (at once, they would meet each other's lease)
    rows = await history(app_env, vm_id("web-01"))
    later = [r["outcome"] + ":" + r["reason"] for r in rows[:9]]
    # the same write, seen before the verdict: answered by the verdict, no Run Command (issue 9)
    assert later == ["skipped:recently-verified"] * 9
    assert [e["script"] for e in sim.run_log(vm_id("web-01"))] == ["detect", "remediate"]


async def test_two_workers_racing_on_one_vm_run_one_workflow(app_env: dict[str, str], sim: Simulator) -> None:
    from shared import triggers

    body = json.dumps({"reason": "manual", "vmId": vm_id("app-02"), "correlationId": "race"})
    outcomes = await asyncio.gather(triggers.work(body), triggers.work(body))
    words = sorted(o.kind.value + ":" + o.reason for batch in outcomes for o in batch)
    # the loser is re-enqueued (a recorded retry), never dropped as a duplicate
    assert words == ["deferred:lease-held", "remediated:avma-channel"]
    assert remediations(sim, "app-02") == 1


async def test_a_deferral_is_re_enqueued_with_a_delay_and_an_attempt_count(
    app_env: dict[str, str], sim: Simulator
) -> None:
    await user("vm_write_event")(event_grid_event(vm_id("busy-04")))
    await drain(app_env, rounds=1)
    async with queue_client(app_env) as queue:
        assert await queue.peek_messages() == []  # invisible for DEFER_DELAY_SECONDS
        await asyncio.sleep(1.2)
        retry = [json.loads(m.content) async for m in queue.receive_messages(visibility_timeout=1)]
    assert [(m["vmId"], m["attempt"]) for m in retry] == [(vm_id("busy-04"), 1)]
    rows = await history(app_env, vm_id("busy-04"))
    assert (rows[0]["outcome"], rows[0]["reason"]) == ("deferred", "run-command-busy")


async def test_a_deferral_past_its_deadline_is_recorded_as_failed(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEFER_DEADLINE_HOURS", "0")
    await user("vm_write_event")(event_grid_event(vm_id("noagent-05")))
    await drain(app_env)
    rows = await history(app_env, vm_id("noagent-05"))
    assert (rows[0]["outcome"], rows[0]["reason"]) == ("failed", "deadline-exceeded:agent-not-ready")
    async with queue_client(app_env) as queue:
        assert await queue.peek_messages() == []


async def test_poison_and_malformed_messages_are_recorded_never_lost(app_env: dict[str, str]) -> None:
    body = json.dumps({"reason": "vm-created", "vmId": vm_id("web-01"), "correlationId": "c-1", "attempt": 4})
    await user("vm_check_poison")(QueueMessage(id="p1", body=body.encode(), dequeue_count=1))
    poison = await history(app_env, vm_id("web-01"))
    assert [(r["outcome"], r["reason"], r["correlationId"]) for r in poison] == [("failed", "poison", "c-1")]

    await user("vm_check")(QueueMessage(id="m1", body=b"definitely not a work item", dequeue_count=1))
    malformed = await history(app_env, "unparsable-message")
    assert [(r["outcome"], r["reason"]) for r in malformed] == [("failed", "malformed-message")]


async def test_status_endpoint_counts_outcomes_and_lists_recent_actions(
    app_env: dict[str, str], sim: Simulator
) -> None:
    await user("vm_write_event")(event_grid_event(vm_id("web-01")))
    await drain(app_env)
    response = await user("status")(
        func.HttpRequest(method="GET", url="/api/status", body=b"", params={"recent": "5"})
    )
    body = json.loads(response.get_body())
    assert body["counts"]["remediated"] == 1
    assert body["recent"][0]["reason"] == "avma-channel"
    bad = await user("status")(
        func.HttpRequest(method="GET", url="/api/status", body=b"", params={"recent": "x"})
    )
    assert bad.status_code == 400


async def test_sweep_timer_enqueues_windows_vms_not_verified_recently(
    app_env: dict[str, str], sim: Simulator
) -> None:
    await user("vm_write_event")(event_grid_event(vm_id("web-01")))
    await drain(app_env)  # web-01 is now verified
    await user("sweep")(TimerRequest(past_due=False))
    async with queue_client(app_env) as queue:
        queued = [
            json.loads(m.content) async for m in queue.receive_messages(max_messages=32, visibility_timeout=1)
        ]
    ids = {m["vmId"].lower() for m in queued}
    windows = {vm_id(n).lower() for n in ("app-02", "db-03", "busy-04", "noagent-05")}
    assert ids == windows  # not web-01 (verified), not the Linux VM
    assert all(m["reason"] == "sweep" for m in queued)
    assert os.environ["REMEDIATION_MODE"] == "enforce"
