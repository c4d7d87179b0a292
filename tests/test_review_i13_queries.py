"""Review of issue 13: what two queries mean, on records the recording does not hold.

The recording (tests/data/telemetry/sample-traces.json) has each VM fail once and its one deferred VM
still deferred, so it cannot tell a distinct-VM count from a record count, or "latest outcome is
deferred" from "was ever deferred". These records are built by shared/telemetry.py's own builder.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from shared import telemetry
from shared.model import Outcome, OutcomeKind
from tests.kql_subset import Query
from tests.test_workbook import alert_rules, query_files

VM = "/subscriptions/6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7/resourceGroups/rg-apps/providers/Microsoft.Compute/virtualMachines/"
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def trace(minute: int, vm_id: str, kind: OutcomeKind, reason: str) -> dict[str, Any]:
    record = telemetry.outcome_record(
        Outcome(vm_id, kind, reason), trigger="sweep", correlation_id="c", first_seen=T0.isoformat()
    )
    return {
        "timestamp": T0 + timedelta(minutes=minute),
        "message": telemetry.PREFIX + json.dumps(record, separators=(",", ":")),
        "customDimensions": {k: str(v) for k, v in record.items() if v is not None},
    }


def test_the_failed_rise_alert_counts_vms_not_records_whatever_the_id_s_case() -> None:
    """A VM that fails on every retry, logged once with ARM's casing and once lower case, is one VM."""
    rule = next(r for r in alert_rules() if r["key"] == "failed-rise")
    rows = [
        trace(1, VM + "web-01", OutcomeKind.FAILED, "activation-error:0xC004F074"),
        trace(5, (VM + "web-01").lower(), OutcomeKind.FAILED, "activation-error:0xC004F074"),
        trace(9, VM + "web-01", OutcomeKind.FAILED, "poison"),
        trace(12, VM + "app-02", OutcomeKind.FAILED, "run-command-timeout"),
    ]
    (row,) = Query.parse(query_files()[rule["file"]]).run({"traces": rows})
    assert row[rule["measure"]] == 2


def test_the_deferred_backlog_leaves_out_a_vm_whose_latest_outcome_is_no_longer_deferred() -> None:
    rows = [
        trace(1, VM + "web-01", OutcomeKind.DEFERRED, "agent-not-ready"),
        trace(6, VM + "web-01", OutcomeKind.REMEDIATED, "avma-channel"),  # the retry worked
        trace(2, VM + "app-02", OutcomeKind.DEFERRED, "agent-not-ready"),
    ]
    (row,) = Query.parse(query_files()["deferred-backlog.kql"]).run({"traces": rows})
    assert (row["reason"], row["VMs"]) == ("agent-not-ready", 1)


def test_would_remediate_lists_only_vms_whose_latest_outcome_is_would_remediate() -> None:
    """After the switch to enforce, a VM that audit listed and enforce then re-keyed is off the list."""
    rows = [
        trace(1, VM + "web-01", OutcomeKind.WOULD_REMEDIATE, "avma-channel"),
        trace(30, VM + "web-01", OutcomeKind.REMEDIATED, "avma-channel"),
        trace(2, VM + "app-02", OutcomeKind.WOULD_REMEDIATE, "avma-channel"),
    ]
    listed = Query.parse(query_files()["would-remediate.kql"]).run({"traces": rows})
    assert [r["vmId"] for r in listed] == [(VM + "app-02").lower()]
