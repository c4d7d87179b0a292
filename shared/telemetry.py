"""One structured log record per outcome, readable by people and by Kusto.

The message is ``avma-outcome `` followed by compact JSON, so Application Insights keeps every
field whichever logging exporter carries it (``traces | where message startswith "avma-outcome"
| extend o = parse_json(substring(message, 13))``); the same fields also go in ``extra`` as
``custom_dimensions`` for exporters that map them. Hints and facts are logged; keys and
tokens never are (no product key is ever part of an outcome).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from shared.model import Outcome

log = logging.getLogger("avma_remediator.outcomes")
PREFIX = "avma-outcome "


def outcome_record(
    outcome: Outcome, *, trigger: str, correlation_id: str, attempt: int = 0, first_seen: str = ""
) -> dict[str, Any]:
    return {
        "firstSeen": first_seen,
        "vmId": outcome.vm_id,
        "outcome": outcome.kind.value,
        "reason": outcome.reason,
        "trigger": trigger,
        "correlationId": correlation_id,
        "attempt": attempt,
        "durationS": outcome.details.get("duration_s"),
        "edition": outcome.details.get("edition"),
        **_kms_path(outcome),
    }


def _kms_path(outcome: Outcome) -> dict[str, Any]:
    """The Azure-side KMS diagnosis (issue 11), when the workflow made one: cause and resource at fault."""
    path = outcome.details.get("kmsPath")
    if not isinstance(path, dict):
        return {}
    findings = [f for f in path.get("findings") or [] if isinstance(f, dict)]
    return {
        "kmsCause": outcome.details.get("kmsCause"),
        "kmsPath": path.get("state"),
        "kmsFindings": [{"cause": f.get("cause"), "resource": f.get("resource")} for f in findings],
    }


def log_outcome(
    outcome: Outcome, *, trigger: str, correlation_id: str, attempt: int = 0, first_seen: str = ""
) -> dict[str, Any]:
    """Log one outcome; ``first_seen`` (when the work item was produced) lets Kusto measure latency."""
    record = outcome_record(
        outcome, trigger=trigger, correlation_id=correlation_id, attempt=attempt, first_seen=first_seen
    )
    level = logging.WARNING if outcome.kind.value == "failed" else logging.INFO
    log.log(level, PREFIX + json.dumps(record, separators=(",", ":")), extra={"custom_dimensions": record})
    return record
