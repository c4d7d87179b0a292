"""Structured log records, readable by people and by Kusto: outcomes, queue states, worker errors.

Each record's message is a prefix (``avma-outcome ``, ``avma-queue ``, ``avma-worker-error ``)
followed by compact JSON, and the same fields go in the record's ``extra``, one attribute per field.
With the Functions OpenTelemetry path (host.json ``"telemetryMode": "OpenTelemetry"`` and the app
setting ``PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true``, docs/operations.md "What is logged")
the Python worker's Azure Monitor exporter sends each attribute as a custom dimension, so
``traces | where message startswith "avma-outcome " | extend outcome = tostring(customDimensions.outcome)``
works; the JSON in the message keeps every field for any other exporter, and for the classic path,
which forwards only the message. Fields whose value is ``None`` are left out of ``extra``
(OpenTelemetry attributes cannot be null). Hints and facts are logged; keys and tokens never are (no
product key is ever part of an outcome).

The queries of the workbook and of the alerts (infra/app/queries/) read only fields these functions
emit; tests/test_workbook.py holds them to that.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from shared.model import Outcome

log = logging.getLogger("avma_remediator.outcomes")
ops_log = logging.getLogger("avma_remediator.operations")
PREFIX = "avma-outcome "
QUEUE_PREFIX = "avma-queue "
WORKER_ERROR_PREFIX = "avma-worker-error "
HINT_MAX_CHARS = 2000


def outcome_record(
    outcome: Outcome, *, trigger: str, correlation_id: str, attempt: int = 0, first_seen: str = ""
) -> dict[str, Any]:
    return {
        "firstSeen": first_seen,
        "vmId": outcome.vm_id,
        "outcome": outcome.kind.value,
        "reason": outcome.reason,
        "hint": outcome.hint[:HINT_MAX_CHARS],
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


def queue_record(
    queue: str, *, messages: int | None, oldest_age_s: float | None, error: str = ""
) -> dict[str, Any]:
    """One queue's state as the probe saw it (shared/queueprobe.py)."""
    return {
        "queue": queue,
        "approximateMessages": messages,
        "oldestVisibleAgeS": None if oldest_age_s is None else round(oldest_age_s, 1),
        "error": error,
    }


def worker_error_record(function: str, error: BaseException) -> dict[str, Any]:
    first = str(error).splitlines()[0][:500] if str(error) else ""
    return {"function": function, "errorType": type(error).__name__, "error": first}


def emit(logger: logging.Logger, level: int, prefix: str, record: dict[str, Any]) -> None:
    """The message form (prefix + JSON) and one ``extra`` attribute per non-null field."""
    dimensions = {key: value for key, value in record.items() if value is not None}
    logger.log(level, prefix + json.dumps(record, separators=(",", ":")), extra=dimensions)


def log_outcome(
    outcome: Outcome, *, trigger: str, correlation_id: str, attempt: int = 0, first_seen: str = ""
) -> dict[str, Any]:
    """Log one outcome; ``first_seen`` (when the work item was produced) lets Kusto measure latency."""
    record = outcome_record(
        outcome, trigger=trigger, correlation_id=correlation_id, attempt=attempt, first_seen=first_seen
    )
    level = logging.WARNING if outcome.kind.value == "failed" else logging.INFO
    emit(log, level, PREFIX, record)
    return record


def log_queue_state(record: dict[str, Any]) -> None:
    level = logging.WARNING if record.get("error") else logging.INFO
    emit(ops_log, level, QUEUE_PREFIX, record)


@contextlib.asynccontextmanager
async def worker_errors(function: str) -> AsyncIterator[None]:
    """Log an exception that ends a queue-triggered invocation (the host then retries the message),
    as one ``avma-worker-error`` record the worker-errors alert counts, and re-raise it."""
    try:
        yield
    except Exception as error:
        emit(ops_log, logging.ERROR, WORKER_ERROR_PREFIX, worker_error_record(function, error))
        raise
