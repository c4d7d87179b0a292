"""The contract between what the app logs (shared/telemetry.py) and what the workbook and the alerts
read (infra/app/queries/*.kql), and the records' real dimensions in Application Insights.

- Every field a query reads (``customDimensions.X``) is one the code emits for the record kind the
  query selects (``message startswith "avma-outcome "`` and so on); the emitted fields come from the
  record builders themselves, never from a list kept here.
- Every query runs over recorded records (tests/data/telemetry/sample-traces.json, written by
  ``python -m tests.record_telemetry`` from the real triggers against the simulator and Azurite)
  with tests/kql_subset.py, a tiny evaluator of the KQL subset the queries use, and answers what
  its tile or alert is for. The recording is held to the code: same fields, same two forms.
- The workbook and the alerts load exactly these files; docs/operations.md shows each verbatim.
- Through OpenTelemetry's logging handler and the Azure Monitor exporter, each field of an outcome
  becomes a custom dimension (the path the Functions worker takes with
  PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from azure.monitor.opentelemetry.exporter.export.logs._exporter import _convert_log_to_envelope
from azure.storage.queue.aio import QueueClient
from opentelemetry.instrumentation.logging.handler import LoggingHandler
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

from shared import telemetry
from shared.lastresort import LAST_RESORT_QUEUE
from shared.model import Outcome, OutcomeKind
from shared.queueprobe import PROBED, probe_queues
from shared.scope import OUT_OF_SCOPE
from tests.kql_subset import Query, Unsupported
from tests.test_function_app import scoped
from tests.test_infra_lib import ROOT, template

QUERIES = ROOT / "infra" / "app" / "queries"
SAMPLE = Path(__file__).resolve().parent / "data" / "telemetry" / "sample-traces.json"
OPERATIONS = ROOT / "docs" / "operations.md"
__all__ = ["scoped"]  # a fixture of tests/test_function_app.py used here


# --- what the code emits -------------------------------------------------------------------------


def emitted_fields() -> dict[str, frozenset[str]]:
    """Record kind (its message prefix) → the fields its builder produces."""
    outcome = telemetry.outcome_record(
        Outcome("vm", OutcomeKind.FAILED, "r"), trigger="t", correlation_id="c"
    )
    queue = telemetry.queue_record("q", messages=1, oldest_age_s=1.0)
    error = telemetry.worker_error_record("f", RuntimeError("boom"))
    return {
        telemetry.PREFIX: frozenset(outcome),
        telemetry.QUEUE_PREFIX: frozenset(queue),
        telemetry.WORKER_ERROR_PREFIX: frozenset(error),
    }


def selected_kind(query: Query) -> str:
    """The record kind a query reads: the ``message startswith "<prefix>"`` it filters on."""
    prefixes = set(re.findall(r'message startswith "([^"]+)"', query.text))
    assert len(prefixes) == 1, f"a query selects exactly one record kind: {prefixes}"
    (prefix,) = prefixes
    assert prefix in emitted_fields(), f"no record is logged with the prefix {prefix!r}"
    return prefix


def unknown_fields(text: str) -> set[str]:
    query = Query.parse(text)
    return query.dimensions - emitted_fields()[selected_kind(query)]


# --- the files -------------------------------------------------------------------------------------


def query_files() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(QUERIES.glob("*.kql"))}


def loaded(value: Any) -> Iterator[str]:
    """Every file a parsed Bicep value loads with loadTextContent."""
    if isinstance(value, dict):
        function = value.get("function")
        if isinstance(function, dict) and function.get("type") == "load_text_content":
            yield function["parameters"]["file_path"]
        for inner in value.values():
            yield from loaded(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from loaded(inner)


@cache
def tiles() -> list[dict[str, str]]:
    """The workbook's query tiles: name, title, query file (infra/app/workbook.bicep)."""
    content = template("app/workbook.bicep")["variables"]["workbookContent"]["value"]
    found = []
    for item in content["items"]:
        if item["type"] != 3:
            continue
        own = item["content"]["function"]["parameters"]["arg_2"]
        (path,) = loaded(own)
        found.append({"name": item["name"], "title": own["title"], "file": Path(path).name})
    return found


@cache
def alert_rules() -> list[dict[str, Any]]:
    rules = template("app/health-alerts.bicep")["variables"]["healthRules"]["value"]
    return [{**rule, "file": Path(next(loaded(rule["query"]))).name} for rule in rules]


def sample_rows() -> list[dict[str, Any]]:
    rows = json.loads(SAMPLE.read_text())
    for row in rows:
        row["timestamp"] = datetime.fromisoformat(row["timestamp"])
    return rows


def run(name: str) -> list[dict[str, Any]]:
    return Query.parse(query_files()[name]).run({"traces": sample_rows()})


# --- contract --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(query_files()))
def test_every_field_a_query_reads_is_one_the_telemetry_emits(name: str) -> None:
    assert unknown_fields(query_files()[name]) == set()


def test_the_field_check_catches_a_field_the_code_does_not_emit() -> None:
    text = query_files()["failing-vms.kql"].replace("customDimensions.hint", "customDimensions.advice")
    assert unknown_fields(text) == {"advice"}
    wrong_kind = (
        'traces\n| where message startswith "avma-queue "\n| extend r = tostring(customDimensions.reason)'
    )
    assert unknown_fields(wrong_kind) == {"reason"}  # a field of another record kind
    with pytest.raises(AssertionError, match="no record"):
        unknown_fields('traces\n| where message startswith "avma-result "')
    with pytest.raises(Unsupported):
        Query.parse("traces\n| join kind=inner (requests) on operation_Id")


@pytest.mark.parametrize("name", sorted(query_files()))
def test_the_words_a_query_compares_with_are_words_the_code_uses(name: str) -> None:
    text = query_files()[name]
    outcomes = {k.value for k in OutcomeKind}
    for word in re.findall(r'customDimensions\.outcome\) == "([^"]+)"', text):
        assert word in outcomes
    for word in re.findall(r'customDimensions\.queue\) == "([^"]+)"', text):
        assert word in PROBED
    reasons = set(re.findall(r'customDimensions\.reason\) == "([^"]+)"', text))
    for listed in re.findall(r"reason in \(([^)]*)\)", text):
        reasons |= set(re.findall(r'"([^"]+)"', listed))
    assert reasons <= {"poison", "malformed-message", OUT_OF_SCOPE}
    for reason in reasons:  # each is a literal the engine writes
        sources = " ".join(p.read_text() for p in (ROOT / "shared").rglob("*.py"))
        assert f'"{reason}"' in sources


def test_the_workbook_and_the_alerts_load_every_query_and_nothing_else() -> None:
    used = [t["file"] for t in tiles()] + [r["file"] for r in alert_rules()]
    assert sorted(used) == sorted(query_files())  # every file once, none missing
    assert all(r["file"].startswith("alert-") for r in alert_rules())
    assert not any(t["file"].startswith("alert-") for t in tiles())


def test_the_workbook_is_a_shared_workbook_on_application_insights() -> None:
    from tests.test_infra_lib import resources

    (workbook,) = [r.body for r in resources("app/workbook.bicep") if r.symbol == "workbook"]
    assert workbook["kind"] == "shared"
    props = workbook["properties"]
    assert props["category"] == "workbook" and props["version"] == "Notebook/1.0"
    assert props["serializedData"] == {
        "function": {"type": "string", "parameters": {"value_to_convert": "workbookContent"}}
    }
    assert props["sourceId"] == {
        "operator": {
            "type": "property_accessor",
            "operands": {"operand_1": "applicationInsights", "operand_2": "id"},
        }
    }
    content = template("app/workbook.bicep")["variables"]["workbookContent"]["value"]
    assert content["version"] == "Notebook/1.0"
    shared = template("app/workbook.bicep")["variables"]["tile"]["value"]
    assert (shared["version"], shared["queryType"], shared["resourceType"]) == (
        "KqlItem/1.0",
        0,
        "microsoft.insights/components",
    )


# --- the queries over recorded records --------------------------------------------------------------


def test_the_recording_has_exactly_the_fields_the_code_emits_in_both_forms() -> None:
    rows = json.loads(SAMPLE.read_text())
    kinds: dict[str, set[str]] = {}
    for row in rows:
        prefix = next(p for p in emitted_fields() if row["message"].startswith(p))
        record = json.loads(row["message"][len(prefix) :])
        kinds.setdefault(prefix, set()).update(record)
        assert set(record) == emitted_fields()[prefix], "re-record: python -m tests.record_telemetry"
        dims = row["customDimensions"]
        for key, value in record.items():  # the message's JSON and the dimensions agree
            if value is None:
                assert key not in dims
            else:
                assert dims[key] == str(value), key
    assert set(kinds) == set(emitted_fields())


def test_outcomes_over_time_counts_vms_per_outcome() -> None:
    rows = run("outcomes-over-time.kql")
    assert set(rows[0]) == {"timestamp", "outcome", "VMs"}
    assert {r["outcome"] for r in rows} == {k.value for k in OutcomeKind}
    assert sum(r["VMs"] for r in rows if r["outcome"] == "remediated") == 2


def test_failing_vms_lists_each_vm_whose_latest_outcome_is_failed_with_its_hint() -> None:
    rows = run("failing-vms.kql")
    assert set(rows[0]) == {"timestamp", "vmId", "reason", "hint", "trigger", "correlationId"}
    by_vm = {r["vmId"].rsplit("/", 1)[-1]: r for r in rows}
    # web-01 was remediated, then its poison message failed: the latest outcome counts
    assert set(by_vm) == {"kms-down-03", "unparsable-message", "web-01"}
    assert by_vm["kms-down-03"]["reason"] == "activation-error:0xC004F074"
    assert "1688" in by_vm["kms-down-03"]["hint"]
    assert [r["reason"] for r in rows] == sorted(r["reason"] for r in rows)


def test_the_deferred_backlog_gives_its_size_and_oldest_item_per_reason() -> None:
    (row,) = run("deferred-backlog.kql")
    noagent = next(r for r in sample_rows() if r["customDimensions"].get("reason") == "agent-not-ready")
    assert (row["reason"], row["VMs"], row["mostAttempts"]) == ("agent-not-ready", 1, 0)
    assert row["oldestFirstSeen"] == datetime.fromisoformat(noagent["customDimensions"]["firstSeen"])


def test_time_to_remediated_counts_only_vm_writes_from_first_seen() -> None:
    (row,) = run("time-to-remediated.kql")
    assert row["VMs"] == 1  # web-01 (vm-created); app-02 came from an alert
    assert 6.5 < row["p50"] < 8 and row["p95"] == row["p50"]  # recorded 7 minutes after firstSeen


def test_refused_messages_counts_poison_malformed_and_out_of_scope() -> None:
    assert {r["reason"]: r["items"] for r in run("refused-messages.kql")} == {
        "malformed-message": 1,
        "out-of-scope": 1,
        "poison": 1,
    }


def test_would_remediate_lists_what_enforce_would_re_key() -> None:
    (row,) = run("would-remediate.kql")
    assert row["vmId"].endswith("/audit-06") and row["edition"] == "Windows Server 2022 Datacenter"


def test_queue_depth_and_worker_errors() -> None:
    depth = {r["queue"]: r["messages"] for r in run("queue-depth.kql")}
    assert depth == {"vm-checks": 2, "vm-checks-poison": 0, LAST_RESORT_QUEUE: 0}
    (error,) = run("worker-errors.kql")
    assert (error["functionName"], error["errorType"], error["errors"]) == ("vm_check", "LedgerError", 1)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("poison", 1),
        ("failed-rise", 3),
        ("worker-errors", 1),
        ("oldest-message", 0.0),
        ("poison-queue-stuck", None),
        ("probe-missing", 3),
        ("probe-failing", 0),  # the recording's one probe run read every queue
    ],
)
def test_each_alert_query_ends_in_the_number_its_rule_compares(key: str, value: float | None) -> None:
    rule = next(r for r in alert_rules() if r["key"] == key)
    rows = run(rule["file"])
    if value is None:  # one probe in the recording: the rule needs two in its window
        assert rows == []
        return
    if key == "oldest-message":  # the age the probe saw, in minutes
        (probe,) = [r for r in sample_rows() if r["customDimensions"].get("queue") == "vm-checks"]
        value = float(probe["customDimensions"]["oldestVisibleAgeS"]) / 60
    (row,) = rows
    assert row[rule["measure"]] == pytest.approx(value)
    assert rule["operator"] == ("LessThan" if key == "probe-missing" else "GreaterThan")


def test_the_probe_alert_fires_on_no_probe_at_all() -> None:
    """With no avma-queue record in the window the count is 0 (a summarize without by gives one
    row), below the threshold of 1: the alert fires when the timer stops."""
    rule = next(r for r in alert_rules() if r["key"] == "probe-missing")
    assert Query.parse(query_files()[rule["file"]]).run({"traces": []}) == [{"probes": 0}]
    assert rule["threshold"] == 1


# --- the docs --------------------------------------------------------------------------------------


def test_operations_md_shows_each_query_verbatim_and_each_tile_with_its_fields() -> None:
    text = OPERATIONS.read_text()
    blocks = [b.strip() for b in re.findall(r"```kusto\n(.*?)```", text, re.DOTALL)]
    for name, query in query_files().items():
        assert query.strip() in blocks, f"docs/operations.md lacks {name} verbatim"
    for tile in tiles():
        section = text.split(f"### {tile['title']}", 1)
        assert len(section) == 2, f"no section for the tile {tile['title']!r}"
        body = section[1].split("\n### ", 1)[0]
        assert query_files()[tile["file"]].strip() in body
        fields = Query.parse(query_files()[tile["file"]]).dimensions
        listed = re.search(r"Fields read: ((?:`[^`]+`(?:, )?)+)", body)
        assert listed is not None and set(re.findall(r"`([^`]+)`", listed[1])) == fields
    for rule in alert_rules():
        assert rule["displayName"] in text


# --- real dimensions, through the exporter the worker uses -------------------------------------------


@pytest.fixture
def exported() -> Iterator[InMemoryLogRecordExporter]:
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    handler = LoggingHandler(logger_provider=provider)
    logger = logging.getLogger("avma_remediator")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield exporter
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_each_outcome_field_is_a_custom_dimension_and_the_message_keeps_the_json(
    exported: InMemoryLogRecordExporter,
) -> None:
    outcome = Outcome("/subscriptions/s/vm", OutcomeKind.FAILED, "kms-unreachable", hint="add a route")
    record = telemetry.log_outcome(outcome, trigger="alert", correlation_id="c-1", attempt=2, first_seen="t0")
    (log_record,) = exported.get_finished_logs()
    envelope = _convert_log_to_envelope(log_record)
    data = envelope.data.base_data
    assert envelope.data.base_type == "MessageData"  # lands in traces
    assert data.message == telemetry.PREFIX + json.dumps(record, separators=(",", ":"))
    expected = {k: str(v) for k, v in record.items() if v is not None}
    assert {k: data.properties[k] for k in expected} == expected
    assert expected["outcome"] == "failed" and expected["attempt"] == "2"


def test_a_worker_exception_is_logged_once_and_raised(exported: InMemoryLogRecordExporter) -> None:
    import asyncio

    async def fail() -> None:
        async with telemetry.worker_errors("vm_check"):
            raise RuntimeError("table down\nsecond line")

    with pytest.raises(RuntimeError):
        asyncio.run(fail())
    (log_record,) = exported.get_finished_logs()
    props = _convert_log_to_envelope(log_record).data.base_data.properties
    assert (props["function"], props["errorType"], props["error"]) == (
        "vm_check",
        "RuntimeError",
        "table down",
    )


async def test_the_probe_reports_each_queue_s_depth_and_oldest_visible_message(
    azurite: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AzureWebJobsStorage", azurite.connection_string)
    name = "probe" + uuid.uuid4().hex[:10]
    async with QueueClient.from_connection_string(azurite.connection_string, name) as queue:
        await queue.create_queue()
        await queue.send_message("one")
        await queue.send_message("later", visibility_timeout=600)  # a deferral: counted, not aged
    later = datetime.now(UTC)
    records = await probe_queues(queues=[name, name + "never"], now=later)
    assert records[0]["queue"] == name and records[0]["approximateMessages"] == 2
    assert 0 <= records[0]["oldestVisibleAgeS"] < 60 and records[0]["error"] == ""
    assert records[1] == {
        "queue": name + "never",
        "approximateMessages": 0,
        "oldestVisibleAgeS": None,
        "error": "",
    }


def hint_reasons() -> set[str]:
    """Every reason shared/hints.py has a hint for: the keys of its table, the prefixes it tests with
    ``startswith`` and the reasons of an unfinished remediation (``_UNFINISHED``)."""
    import ast

    tree = ast.parse((ROOT / "shared" / "hints.py").read_text())
    reasons: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            reasons |= {
                k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
            }
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "startswith"
        ):
            reasons |= {
                a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
            }
        elif isinstance(node, ast.Assign) and any(
            getattr(t, "id", "") == "_UNFINISHED" for t in node.targets
        ):
            assert isinstance(node.value, ast.Tuple)
            reasons |= {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    return reasons


def test_the_runbook_lists_every_failure_reason_the_hints_know() -> None:
    text = OPERATIONS.read_text()
    table = text.split("## Failure reasons and what to do", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([^`]+)`", table))
    reasons = hint_reasons()
    assert len(reasons) > 25  # the scan sees the table, the prefixes and _UNFINISHED
    assert reasons - listed == set()
    assert {"poison", "malformed-message", OUT_OF_SCOPE} <= listed  # the app's own


async def test_a_malformed_message_and_a_refusal_are_outcome_records_with_their_fields_as_attributes(
    scoped: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """What the tiles of refused and deferred items count: the malformed message is an outcome
    record too, and a refusal carries the item's firstSeen; each field is a record attribute (what
    OpenTelemetry turns into a custom dimension)."""
    from shared import triggers
    from tests.test_function_app import FOREIGN

    caplog.set_level(logging.INFO, logger="avma_remediator.outcomes")
    first = "2026-12-01T10:00:00+00:00"
    await triggers.work("definitely not a work item")
    await triggers.work(
        json.dumps({"reason": "vm-created", "vmId": FOREIGN, "correlationId": "c", "firstSeen": first})
    )
    logged = [r for r in caplog.records if r.getMessage().startswith(telemetry.PREFIX)]
    records = [json.loads(r.getMessage()[len(telemetry.PREFIX) :]) for r in logged]
    assert [(r["vmId"], r["outcome"], r["reason"]) for r in records] == [
        ("unparsable-message", "failed", "malformed-message"),
        (FOREIGN, "skipped", OUT_OF_SCOPE),
    ]
    assert records[1]["firstSeen"] == first
    for log_record, record in zip(logged, records, strict=True):
        assert {k: getattr(log_record, k) for k, v in record.items() if v is not None} == {
            k: v for k, v in record.items() if v is not None
        }
