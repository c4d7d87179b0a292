"""Real public payload samples (tests/data/samples, see SOURCES.md) and minimal variants of them.

A variant changes only the fields named; everything else stays as published.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from shared.intake import VM_WRITE

SAMPLES = Path(__file__).parent / "data" / "samples"
EG_WRITE = "eventgrid_ResourceWriteSuccess_eventgrid-schema_spec-example.json"
CE_WRITE = "eventgrid_ResourceWriteSuccess_cloudevents-schema_spec-example.json"
ALERT_V2 = "common-alert-schema_log-alerts-v2_full-payload.json"


def load(name: str) -> Any:
    return json.loads((SAMPLES / name).read_text(encoding="utf-8"))


def as_vm_write(event: dict[str, Any], resource: str) -> dict[str, Any]:
    """The spec sample (a storage-account write) turned into a VM write: only the fields that differ.

    Per the facts file: operationName, authorization.action, resourceProvider, resourceUri, subject.
    """
    event = copy.deepcopy(event)
    data = event["data"]
    data["operationName"] = VM_WRITE
    data["authorization"]["action"] = VM_WRITE
    data["resourceProvider"] = "Microsoft.Compute"
    data["resourceUri"] = resource
    event["subject"] = resource
    return event


def as_cloud_event(event: dict[str, Any]) -> dict[str, Any]:
    """The Event Grid → CloudEvents 1.0 mapping: type, source = topic, subject, id, time, data."""
    return {
        "source": event["topic"],
        "subject": event["subject"],
        "type": event["eventType"],
        "time": event["eventTime"],
        "id": event["id"],
        "data": copy.deepcopy(event["data"]),
        "specversion": "1.0",
    }


def v2_alert(
    *,
    dimensions: list[dict[str, Any]] | None = None,
    targets: list[str] | None = None,
    configuration_items: list[str] | None = None,
    condition: str | None = None,
) -> dict[str, Any]:
    """The published Log Alerts V2 payload with only the named fields replaced."""
    alert: dict[str, Any] = load(ALERT_V2)
    essentials = alert["data"]["essentials"]
    if dimensions is not None:
        alert["data"]["alertContext"]["condition"]["allOf"][0]["dimensions"] = dimensions
    if targets is not None:
        essentials["alertTargetIDs"] = targets
    if configuration_items is not None:
        essentials["configurationItems"] = configuration_items
    if condition is not None:
        essentials["monitorCondition"] = condition
    return alert


def dim(name: str, value: Any) -> dict[str, Any]:
    return {"name": name, "value": value}
