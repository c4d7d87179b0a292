"""The queue probe when Queue storage is down, and the alert that fires when it keeps failing.

The probe's records go through the path the Functions worker uses (OpenTelemetry's logging handler
and the Azure Monitor exporter's envelope, as tests/record_telemetry.py records them), and the
``probe-failing`` rule's query (infra/app/queries/alert-probe-failing.kql) runs over them with
tests/kql_subset.py: ten-minute probe runs, failing or not, in the rule's 30-minute window.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest
from azure.monitor.opentelemetry.exporter.export.logs._exporter import _convert_log_to_envelope
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter

from shared.queueprobe import PROBED, probe_queues
from shared.telemetry import QUEUE_PREFIX
from tests.kql_subset import Query
from tests.record_telemetry import row
from tests.test_ops_unavailable import hanging_port, storage_at
from tests.test_workbook import alert_rules, exported, query_files, sample_rows

__all__ = ["exported", "hanging_port"]  # fixtures defined in the modules they come from


def rule() -> dict[str, Any]:
    return next(r for r in alert_rules() if r["key"] == "probe-failing")


def fires(rows: list[dict[str, Any]]) -> int:
    """The rule's measure over ``rows``, checked against its threshold the way Azure Monitor does."""
    (result,) = Query.parse(query_files()[rule()["file"]]).run({"traces": rows})
    measure = result[rule()["measure"]]
    assert rule()["operator"] == "GreaterThan" and rule()["threshold"] == 0
    return int(measure)


def healthy_run() -> list[dict[str, Any]]:
    """The recording's probe run (tests/data/telemetry/sample-traces.json): every queue read."""
    return [r for r in sample_rows() if r["message"].startswith(QUEUE_PREFIX)]


def shifted(rows: list[dict[str, Any]], minutes: int) -> list[dict[str, Any]]:
    return [{**r, "timestamp": r["timestamp"] + timedelta(minutes=minutes)} for r in rows]


async def failing_run(monkeypatch: pytest.MonkeyPatch, exporter: InMemoryLogRecordExporter) -> list[Any]:
    """One real probe run against Queue storage that refuses connections, as exported rows."""
    from datetime import datetime

    monkeypatch.setenv("AzureWebJobsStorage", storage_at(9))
    monkeypatch.setenv("TARGET_SUBSCRIPTIONS", "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7")
    before = len(exporter.get_finished_logs())
    await asyncio.wait_for(probe_queues(), 10)
    rows = [row(_convert_log_to_envelope(r)) for r in exporter.get_finished_logs()[before:]]
    for r in rows:
        r["timestamp"] = datetime.fromisoformat(r["timestamp"])
    return rows


# --- the probe itself -----------------------------------------------------------------------------


async def test_a_probe_of_storage_that_refuses_connections_reports_each_queue_within_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AzureWebJobsStorage", storage_at(9))
    started = time.monotonic()
    records = await asyncio.wait_for(probe_queues(), 10)  # before: over four minutes of SDK retries
    assert time.monotonic() - started < 5
    assert [r["queue"] for r in records] == list(PROBED)
    for record in records:
        assert record["approximateMessages"] is None and record["oldestVisibleAgeS"] is None
        assert "127.0.0.1:9" in record["error"]  # what storage answered, for the operator


async def test_a_probe_of_storage_that_never_answers_stops_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch, hanging_port: int
) -> None:
    monkeypatch.setenv("AzureWebJobsStorage", storage_at(hanging_port))
    monkeypatch.setattr("shared.queueprobe.PROBE_DEADLINE_S", 0.3)
    started = time.monotonic()
    records = await asyncio.wait_for(probe_queues(), 10)
    assert time.monotonic() - started < 3
    assert [r["error"] for r in records] == ["no answer within 0.3 s"] * len(PROBED)


# --- the alert over the probe's records -----------------------------------------------------------


async def test_the_alert_fires_when_every_probe_of_the_window_failed(
    monkeypatch: pytest.MonkeyPatch, exported: InMemoryLogRecordExporter
) -> None:
    run = await failing_run(monkeypatch, exported)
    assert len(run) == len(PROBED) and all(r["customDimensions"]["error"] for r in run)
    assert fires(run + shifted(run, 10)) == len(PROBED)  # two runs ten minutes apart, both failed
    assert fires(run + shifted(run, 10) + shifted(run, 20)) == len(PROBED)


async def test_one_failed_run_or_a_good_run_in_the_window_does_not_fire(
    monkeypatch: pytest.MonkeyPatch, exported: InMemoryLogRecordExporter
) -> None:
    run = await failing_run(monkeypatch, exported)
    good = healthy_run()
    assert len(good) == len(PROBED)
    assert fires(run) == 0  # one blip: the rule wants two failed probes
    assert fires(shifted(run, -10) + good) == 0  # storage came back
    assert fires(good + shifted(good, 10)) == 0
    assert fires([]) == 0  # no probe at all is the probe-missing alert's case, not this one


async def test_a_queue_that_fails_alone_is_counted_alone(
    monkeypatch: pytest.MonkeyPatch, exported: InMemoryLogRecordExporter
) -> None:
    run = await failing_run(monkeypatch, exported)
    poison = [r for r in run if r["customDimensions"]["queue"] == "vm-checks-poison"]
    others = [r for r in healthy_run() if r["customDimensions"]["queue"] != "vm-checks-poison"]
    assert fires(poison + others + shifted(poison + others, 10)) == 1


async def test_storage_back_at_the_window_s_last_probe_does_not_fire(
    monkeypatch: pytest.MonkeyPatch, exported: InMemoryLogRecordExporter
) -> None:
    """Two failed probes and then a good one: the queue is readable again, so the rule (every probe
    failed) does not fire, and an alert that had fired resolves (autoMitigate)."""
    run = await failing_run(monkeypatch, exported)
    good = healthy_run()
    assert fires(run + shifted(run, 10) + shifted(good, 20)) == 0
    assert fires(shifted(good, -10) + run + shifted(run, 10)) == 0  # one good probe, then the outage


def test_a_good_probe_is_one_whose_error_is_empty_or_absent() -> None:
    """An exporter that drops the empty ``error`` attribute must not turn good probes into failures."""
    good = healthy_run()
    absent = [
        {**r, "customDimensions": {k: v for k, v in r["customDimensions"].items() if k != "error"}}
        for r in good
    ]
    assert all("error" not in r["customDimensions"] for r in absent)
    assert fires(absent + shifted(absent, 10)) == 0
    assert fires(good + shifted(absent, 10)) == 0
