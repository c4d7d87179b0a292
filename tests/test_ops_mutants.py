"""What the operator relies on in the status and check endpoints, the queue probe, the last-resort
drain and the workbook and alert queries, pinned where the issue 13 mutant round found it unpinned.

Each test names the documented behaviour (docs/operations.md) it holds; the mutants that survived
without it are listed in the branch's report. The queries run over records built by
shared/telemetry.py's own builders (as tests/test_review_i13_queries.py does), with
tests/kql_subset.py.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.storage.queue.aio import QueueClient

from shared import telemetry
from shared.lastresort import LAST_RESORT_QUEUE, DrainQueue, Message, drain, record_poison
from shared.model import Outcome, OutcomeKind
from shared.queueprobe import probe_queues
from shared.recheck import MAX_CHECK_BYTES, MAX_CHECK_VMS, CheckRequestError, parse_check_request
from shared.settings import Settings
from shared.status import MAX_PAGE_SIZE, StatusQuery
from tests.kql_subset import Query
from tests.test_function_app import vm_id
from tests.test_status_api import NOW, get_status, ledger_env, names
from tests.test_workbook import alert_rules, query_files

__all__ = ["ledger_env"]  # a fixture of tests/test_status_api.py used here

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


# --- GET /api/status -----------------------------------------------------------------------------


def test_status_takes_the_documented_largest_page() -> None:
    """docs/operations.md: ``pageSize`` 1 to 100."""
    assert StatusQuery.from_params({"pageSize": str(MAX_PAGE_SIZE)}).page_size == MAX_PAGE_SIZE == 100
    assert StatusQuery.from_params({"pageSize": "1"}).page_size == 1


async def test_since_includes_a_verdict_reached_exactly_at_that_time(ledger_env: dict[str, str]) -> None:
    """``since``: the verdict was reached at or after it (both in Table storage's filter and here)."""
    exactly = (NOW - timedelta(hours=1)).isoformat()  # when a-01's verdict was stored
    code, body = await get_status(since=exactly)
    assert code == 200, body
    assert names(body) == ["a-01"]


async def test_a_status_page_stops_at_its_scan_bound_with_a_token_even_when_it_found_nothing(
    ledger_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page reads at most MAX_SCANNED_PER_PAGE state rows: a short (even empty) page with a token."""
    import shared.status

    monkeypatch.setattr(shared.status, "MAX_SCANNED_PER_PAGE", 2)
    code, body = await get_status(vm="a-06")  # the sixth VM: not among the first two rows read
    assert code == 200, body
    assert body["items"] == [] and body["continuation"]


# --- POST /api/check -------------------------------------------------------------------------------


def test_a_check_takes_up_to_the_documented_fifty_vms() -> None:
    ids = [vm_id(f"v-{i:02}") for i in range(MAX_CHECK_VMS)]
    assert MAX_CHECK_VMS == 50
    assert [str(v) for v in parse_check_request(json.dumps({"vmIds": ids}).encode())] == ids


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (json.dumps({"vmId": vm_id("a"), "vmIds": [vm_id("b")]}).encode(), "expected"),
        (json.dumps({"vmIds": vm_id("a")}).encode(), "vmIds must be a non-empty list"),
        (b" " * MAX_CHECK_BYTES + json.dumps({"vmId": vm_id("a")}).encode(), f"exceeds {MAX_CHECK_BYTES}"),
    ],
    ids=["both-forms", "ids-as-a-string", "over-64-KiB"],
)
def test_a_check_body_of_the_wrong_shape_is_refused_saying_what_is_wrong(body: bytes, says: str) -> None:
    with pytest.raises(CheckRequestError, match=says):
        parse_check_request(body)


# --- the last-resort drain and the poison record ----------------------------------------------------


class Recorder:
    """A ledger that writes rows (or refuses them: ``down`` every one, ``refuse`` those of VMs)."""

    def __init__(self, *, down: bool = False, refuse: bool = False) -> None:
        self.rows: list[dict[str, Any]] = []
        self.tries = 0
        self.down, self.refuse = down, refuse

    async def record_event(self, target: str, kind: str, reason: str, **fields: Any) -> None:
        self.tries += 1
        if self.down or (self.refuse and target.startswith("/subscriptions/")):
            raise RuntimeError("ledger record failed: table service unavailable")
        self.rows.append({"target": target, "kind": kind, "reason": reason, **fields})


class Held:
    """The last-resort queue as the drain sees it: messages received, and those deleted."""

    def __init__(self, bodies: list[str]) -> None:
        self.messages = [
            Message(f"m{i}", f"r{i}", body, dequeue_count=6, inserted_on="2026-12-01T08:00:00+00:00")
            for i, body in enumerate(bodies)
        ]
        self.deleted: list[str] = []

    async def receive(self, *, max_messages: int, visibility_s: int) -> AsyncIterator[Message]:
        for message in self.messages[:max_messages]:
            yield message

    async def delete(self, message: Message) -> None:
        self.deleted.append(message.id)


def work_item(name: str) -> str:
    return json.dumps({"reason": "alert", "vmId": vm_id(name), "correlationId": "c-" + name, "attempt": 1})


async def test_a_last_resort_run_during_an_outage_stops_at_the_first_failure_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ "The run stops": at the first message whose rows cannot be written, not after trying every
    message (up to 512, each with the ledger's own retries); nothing deleted; and the run's summary
    line the last-resort alert looks for."""
    caplog.set_level(logging.ERROR, logger="shared.lastresort")
    queue, ledger = Held([work_item("a"), work_item("b"), work_item("c")]), Recorder(down=True)
    report = await drain(queue, ledger)  # type: ignore[arg-type]
    assert ledger.tries == 2  # the first message only: its own row, then the fallback row
    assert (queue.deleted, report.recorded) == ([], 0)
    assert "table service unavailable" in report.stopped
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("last-resort drain stopped") for line in lines)
    assert any(line.startswith(f"last-resort queue {LAST_RESORT_QUEUE}: 0 messages") for line in lines)


async def test_a_last_resort_row_keeps_when_the_message_was_queued_and_how_often_it_was_tried() -> None:
    """Each drained message is recorded with ``dequeueCount`` and ``insertedOn`` (docs/operations.md)."""
    queue, ledger = Held([work_item("a")]), Recorder()
    report = await drain(queue, ledger)  # type: ignore[arg-type]
    (row,) = ledger.rows
    assert row["details"]["dequeueCount"] == 6
    assert row["details"]["insertedOn"] == "2026-12-01T08:00:00+00:00"
    assert row["details"]["lastResort"] is True and row["target"] == vm_id("a")
    assert report.to_dict() == {"recorded": 1, "fallback": 0, "stopped": ""}


async def test_the_last_resort_summary_counts_only_the_rows_recorded_under_the_fallback_target() -> None:
    queue = Held([work_item("a"), "not a work item"])
    ledger = Recorder(refuse=True)  # a VM's row refused, the unparsable one written under its target
    report = await drain(queue, ledger)  # type: ignore[arg-type]
    assert [r["target"] for r in ledger.rows] == ["last-resort-message", "unparsable-message"]
    assert (report.recorded, report.fallback) == (2, 1)


async def test_a_deeply_nested_last_resort_body_is_recorded_as_unparsable_not_stuck_forever() -> None:
    """A body json cannot parse without recursing too deep must not stop every run at it."""
    deep = "[" * 100_000 + "]" * 100_000
    queue, ledger = Held([deep, work_item("b")]), Recorder()
    report = await drain(queue, ledger)  # type: ignore[arg-type]
    assert report.stopped == "" and report.recorded == 2 and queue.deleted == ["m0", "m1"]
    assert ledger.rows[0]["target"] == "unparsable-message"


async def test_a_poison_item_is_an_avma_outcome_record_the_poison_alert_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=telemetry.log.name)
    await record_poison(Recorder(), work_item("a"))  # type: ignore[arg-type]
    records = [r for r in caplog.records if r.getMessage().startswith(telemetry.PREFIX)]
    (record,) = [json.loads(r.getMessage()[len(telemetry.PREFIX) :]) for r in records]
    assert (record["vmId"], record["outcome"], record["reason"]) == (vm_id("a"), "failed", "poison")
    rule = next(r for r in alert_rules() if r["key"] == "poison")
    row = {
        "timestamp": T0,
        "message": records[0].getMessage(),
        "customDimensions": {k: str(v) for k, v in record.items() if v is not None},
    }
    (result,) = Query.parse(query_files()[rule["file"]]).run({"traces": [row]})
    assert result[rule["measure"]] == 1


async def test_one_last_resort_run_records_at_most_its_cap_and_leaves_the_rest_queued(azurite: Any) -> None:
    """At most MAX_PER_RUN messages per run (here 2 of 3) through the real queue client."""
    settings = Settings.from_env({"AzureWebJobsStorage": azurite.connection_string})
    async with QueueClient.from_connection_string(azurite.connection_string, LAST_RESORT_QUEUE) as raw:
        try:
            await raw.create_queue()
        except Exception:  # there from an earlier test: empty it
            await raw.clear_messages()
    queue = DrainQueue.last_resort(settings, None)
    try:
        for name in ("a", "b", "c"):
            await queue._client.send_message(work_item(name))
        ledger = Recorder()
        report = await drain(queue, ledger, max_messages=2, visibility_s=60)  # type: ignore[arg-type]
        assert report.recorded == 2 and len(ledger.rows) == 2
        assert (await queue._client.get_queue_properties()).approximate_message_count == 1
    finally:
        await queue._client.clear_messages()
        await queue.close()


# --- the queue probe ---------------------------------------------------------------------------------


async def test_a_probe_with_no_queue_storage_configured_records_why_and_does_not_raise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ "A probe never fails the timer": the last-resort drain runs after it in the same timer."""
    monkeypatch.delenv("AzureWebJobsStorage", raising=False)
    monkeypatch.setenv("AzureWebJobsStorage__tableServiceUri", "https://example.table.core.windows.net")
    records = await probe_queues()
    assert {r["queue"] for r in records} == {"vm-checks", "vm-checks-poison", "vm-checks-poison-poison"}
    assert all(r["approximateMessages"] is None and r["error"] for r in records)


async def test_a_probe_error_is_one_line_saying_what_storage_answered(
    azurite: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record's ``error`` is the first line of the answer (a dimension, one line, in the alert)."""
    monkeypatch.setenv("AzureWebJobsStorage", azurite.connection_string)
    (record,) = await probe_queues(queues=["Not_A_Queue_Name"])
    assert record["error"] and "\n" not in record["error"] and record["approximateMessages"] is None


async def test_a_message_stamped_ahead_of_the_probe_s_clock_has_age_zero(
    azurite: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clock skew between Queue storage and the app never gives a negative age."""
    name = "skew" + uuid.uuid4().hex[:10]
    async with QueueClient.from_connection_string(azurite.connection_string, name) as queue:
        await queue.create_queue()
        await queue.send_message("one")
    monkeypatch.setenv("AzureWebJobsStorage", azurite.connection_string)
    (record,) = await probe_queues(queues=[name], now=datetime.now(UTC) - timedelta(hours=1))
    assert record["oldestVisibleAgeS"] == 0.0 and record["approximateMessages"] == 1


# --- the queries over built records ------------------------------------------------------------------

VM = "/subscriptions/6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7/resourceGroups/rg-apps/providers/Microsoft.Compute/virtualMachines/"


def as_trace(minute: float, prefix: str, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "timestamp": T0 + timedelta(minutes=minute),
        "message": prefix + json.dumps(record, separators=(",", ":")),
        "customDimensions": {k: str(v) for k, v in record.items() if v is not None},
    }


def outcome(
    minute: float, name: str, kind: OutcomeKind, reason: str, *, trigger: str = "sweep", first: float = 0
) -> dict[str, Any]:
    record = telemetry.outcome_record(
        Outcome(VM + name, kind, reason),
        trigger=trigger,
        correlation_id="c",
        first_seen=(T0 + timedelta(minutes=first)).isoformat(),
    )
    return as_trace(minute, telemetry.PREFIX, record)


def probe(minute: float, queue: str, messages: int | None, age_s: float | None = None) -> dict[str, Any]:
    return as_trace(
        minute, telemetry.QUEUE_PREFIX, telemetry.queue_record(queue, messages=messages, oldest_age_s=age_s)
    )


def run(name: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return Query.parse(query_files()[name]).run({"traces": rows})


def measure(key: str, rows: list[dict[str, Any]]) -> Any:
    rule = next(r for r in alert_rules() if r["key"] == key)
    results = run(rule["file"], rows)
    return results[0][rule["measure"]] if results else None


def test_the_poison_alert_counts_poison_items_and_nothing_else() -> None:
    rows = [
        outcome(1, "a", OutcomeKind.FAILED, "malformed-message"),
        outcome(2, "b", OutcomeKind.FAILED, "malformed-message"),
        outcome(3, "c", OutcomeKind.FAILED, "poison"),
        outcome(4, "d", OutcomeKind.FAILED, "activation-error:0xC004F074"),
    ]
    assert measure("poison", rows) == 1


def test_the_oldest_message_alert_takes_the_oldest_age_the_window_s_probes_saw() -> None:
    rows = [probe(0, "vm-checks", 3, 40 * 60.0), probe(10, "vm-checks", 1, 10 * 60.0)]
    assert measure("oldest-message", rows) == pytest.approx(40.0)


def test_the_stuck_poison_queue_alert_needs_messages_in_every_probe_of_its_window() -> None:
    emptied = [probe(0, "vm-checks-poison", 3), probe(10, "vm-checks-poison", 0)]
    stuck = [probe(0, "vm-checks-poison", 3), probe(10, "vm-checks-poison", 1)]
    assert measure("poison-queue-stuck", emptied) == 0  # the handler emptied it: not above 0
    assert measure("poison-queue-stuck", stuck) == 1


def test_the_failing_vms_tile_leaves_out_a_vm_whose_latest_outcome_is_no_longer_failed() -> None:
    rows = [
        outcome(1, "web-01", OutcomeKind.FAILED, "activation-error:0xC004F074"),
        outcome(9, "web-01", OutcomeKind.REMEDIATED, "avma-channel"),  # fixed and re-checked
        outcome(2, "app-02", OutcomeKind.FAILED, "forbidden"),
    ]
    assert [r["vmId"] for r in run("failing-vms.kql", rows)] == [(VM + "app-02").lower()]


def test_the_deferred_backlog_gives_the_oldest_first_seen_of_its_vms() -> None:
    rows = [
        outcome(10, "web-01", OutcomeKind.DEFERRED, "agent-not-ready", first=-60),
        outcome(11, "app-02", OutcomeKind.DEFERRED, "agent-not-ready", first=-5),
    ]
    (row,) = run("deferred-backlog.kql", rows)
    assert (row["VMs"], row["oldestFirstSeen"]) == (2, T0 - timedelta(minutes=60))


def test_time_to_remediated_gives_a_p95_above_the_median_when_a_few_vms_waited_long() -> None:
    rows = [
        outcome(m, f"v-{m}", OutcomeKind.REMEDIATED, "avma-channel", trigger="vm-created")
        for m in [2] * 18 + [30, 60]
    ]
    (row,) = run("time-to-remediated.kql", rows)
    assert row["p50"] == pytest.approx(2.0) and row["p95"] == pytest.approx(30.0) and row["VMs"] == 20


def test_outcomes_over_time_counts_vms_not_records() -> None:
    rows = [
        outcome(1, "web-01", OutcomeKind.DEFERRED, "agent-not-ready"),
        outcome(5, "web-01", OutcomeKind.DEFERRED, "agent-not-ready"),  # retried in the same hour
        outcome(6, "app-02", OutcomeKind.DEFERRED, "agent-not-ready"),
    ]
    (row,) = run("outcomes-over-time.kql", rows)
    assert (row["outcome"], row["VMs"]) == ("deferred", 2)


def test_queue_depth_shows_a_bin_s_highest_count_when_the_timer_ran_twice_in_it() -> None:
    """The runbook runs poison_drain by hand: two probes can fall in one ten-minute bin."""
    rows = [probe(1, "vm-checks-poison", 5), probe(4, "vm-checks-poison", 2)]
    (row,) = run("queue-depth.kql", rows)
    assert (row["queue"], row["messages"]) == ("vm-checks-poison", 5)
