"""Intake: real payload samples (tests/data/samples, see SOURCES.md) in, the right work items out.

Variants of a sample change only the fields named in the test; everything else stays as published.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.intake import (
    COMMON_ALERT_SCHEMA,
    MAX_ALERT_BYTES,
    VALIDATION_EVENT,
    VM_WRITE,
    WRITE_SUCCESS,
    IntakeError,
    IntakeResult,
    from_alert,
    from_event_grid,
    from_log_rows,
    from_payload,
)
from shared.intake_cli import run_intake
from shared.model import Trigger, VmId, WorkItem
from tests.payloads import as_cloud_event, dim, load, v2_alert
from tests.payloads import as_vm_write as _as_vm_write

SAMPLES = Path(__file__).parent / "data" / "samples"
EG_WRITE = "eventgrid_ResourceWriteSuccess_eventgrid-schema_spec-example.json"
CE_WRITE = "eventgrid_ResourceWriteSuccess_cloudevents-schema_spec-example.json"
EG_DELETE = "eventgrid_ResourceDeleteSuccess_eventgrid-schema_spec-example.json"
EG_FAILURE = "eventgrid_ResourceWriteFailure_eventgrid-schema_spec-example.json"
EG_VALIDATION = "eventgrid_SubscriptionValidationEvent_webhook-doc.json"
ALERT_V2 = "common-alert-schema_log-alerts-v2_full-payload.json"
ALERT_V2_COMPUTER_CONTEXT = "common-alert-schema_log-alerts-v2_alertContext-fragment_current-doc.json"
ALERT_V1_CONTEXT = "common-alert-schema_log-analytics-v1_alertContext-fragment_2020-doc.json"
ALERT_METRIC = "common-alert-schema_metric-alert_full-payload.json"
LA_RESPONSE = "loganalytics-query-response_oms-post-example.json"

NOW = datetime(2026, 11, 28, 12, 30, 5, 123456, tzinfo=UTC)
STAMP = "2026-11-28T12:30:05Z"
SUB = "0b4c1e4a-5f2e-4a4e-9b8e-2f1a6c3d7e90"
VM_ID = f"/subscriptions/{SUB}/resourceGroups/prod-rg/providers/Microsoft.Compute/virtualMachines/web-01"
OTHER_VM_ID = (
    f"/subscriptions/{SUB}/resourceGroups/prod-rg/providers/Microsoft.Compute/virtualMachines/web-02"
)
WORKSPACE_ID = (
    f"/subscriptions/{SUB}/resourcegroups/ops/providers/microsoft.operationalinsights/workspaces/ops-law"
)
PLACEHOLDER_SUB = "12345a-1234b-123c-123d-12345678e"  # the alert docs' subscription placeholder (not a GUID)


def vm(text: str) -> VmId:
    return VmId.parse(text)


def targets(result: IntakeResult) -> list[str]:
    return [item.target for item in result.items]


# --- Event Grid --------------------------------------------------------------------------------


def as_vm_write(event: dict[str, Any], resource: str = VM_ID) -> dict[str, Any]:
    return _as_vm_write(event, resource)


def test_the_cloudevents_mapping_reproduces_the_published_cloudevents_sample() -> None:
    # so the VM variants built with as_cloud_event have the real CloudEvents shape
    assert as_cloud_event(load(EG_WRITE)) == load(CE_WRITE)


def test_vm_write_event_gives_one_vm_created_item() -> None:
    event = as_vm_write(load(EG_WRITE))
    result = from_event_grid(event, now=NOW)
    assert result.ignored == []
    assert result.items == [
        WorkItem(
            reason=Trigger.VM_CREATED,
            vm_id=vm(VM_ID),
            correlation_id="{ID}",  # data.correlationId, verbatim from the sample
            source="4db48cba-50a2-455a-93b4-de41a3b5b7f6",  # the event id
            attempt=0,
            first_seen=STAMP,
        )
    ]


@pytest.mark.parametrize("schema", ["eventgrid", "cloudevents-published", "cloudevents-mapped"])
def test_vm_write_in_either_schema_one_event_or_an_array(schema: str) -> None:
    if schema == "eventgrid":
        event = as_vm_write(load(EG_WRITE))
    elif schema == "cloudevents-published":
        event = as_vm_write(load(CE_WRITE))
    else:
        event = as_cloud_event(as_vm_write(load(EG_WRITE)))
    for payload in (event, [event]):
        result = from_payload(payload, now=NOW)
        assert targets(result) == [VM_ID]
        assert result.items[0].reason is Trigger.VM_CREATED
        assert result.items[0].source == "4db48cba-50a2-455a-93b4-de41a3b5b7f6"


def test_vm_write_with_lower_case_ids_and_operation() -> None:
    event = as_vm_write(load(EG_WRITE), resource=VM_ID.lower())
    event["data"]["operationName"] = VM_WRITE.lower()
    result = from_event_grid([event], now=NOW)
    assert [item.vm_id for item in result.items] == [vm(VM_ID)]


def test_resource_uri_missing_falls_back_to_subject() -> None:
    event = as_vm_write(load(EG_WRITE))
    del event["data"]["resourceUri"]
    event["subject"] = OTHER_VM_ID
    assert targets(from_event_grid(event, now=NOW)) == [OTHER_VM_ID]


def test_correlation_id_missing_falls_back_to_the_event_id() -> None:
    event = as_vm_write(load(EG_WRITE))
    del event["data"]["correlationId"]
    (item,) = from_event_grid(event, now=NOW).items
    assert item.correlation_id == item.source == "4db48cba-50a2-455a-93b4-de41a3b5b7f6"


def _vm_delete() -> dict[str, Any]:
    event = as_vm_write(load(EG_DELETE))
    event["data"]["operationName"] = "Microsoft.Compute/virtualMachines/delete"
    return event


def _extension_write() -> dict[str, Any]:
    event = as_vm_write(load(EG_WRITE), resource=VM_ID + "/extensions/MicrosoftMonitoringAgent")
    event["data"]["operationName"] = "Microsoft.Compute/virtualMachines/extensions/write"
    return event


def _vm_operation_on_extension_resource() -> dict[str, Any]:
    return as_vm_write(load(EG_WRITE), resource=VM_ID + "/extensions/MicrosoftMonitoringAgent")


def _write_not_succeeded() -> dict[str, Any]:
    event = as_vm_write(load(EG_WRITE))
    event["data"]["status"] = "Failed"
    return event


def _vm_write_failure() -> dict[str, Any]:
    return as_vm_write(load(EG_FAILURE))  # the spec sample still says status Succeeded: eventType decides


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: load(EG_WRITE), "'Microsoft.Storage/storageAccounts/write' is not a VM write"),
        (lambda: load(CE_WRITE), "'Microsoft.Storage/storageAccounts/write' is not a VM write"),
        (lambda: load(EG_DELETE), "'Microsoft.Resources.ResourceDeleteSuccess' is not"),
        (_vm_delete, "'Microsoft.Resources.ResourceDeleteSuccess' is not"),
        (lambda: as_cloud_event(_vm_delete()), "'Microsoft.Resources.ResourceDeleteSuccess' is not"),
        (lambda: load(EG_FAILURE), "'Microsoft.Resources.ResourceWriteFailure' is not"),
        (_vm_write_failure, "'Microsoft.Resources.ResourceWriteFailure' is not"),
        (_extension_write, "'Microsoft.Compute/virtualMachines/extensions/write' is not a VM write"),
        (
            _vm_operation_on_extension_resource,
            "/extensions/MicrosoftMonitoringAgent' is not a virtual machine id",
        ),
        (_write_not_succeeded, "status 'Failed' is not Succeeded"),
        (lambda: as_vm_write(load(EG_WRITE), resource=WORKSPACE_ID), "is a Log Analytics workspace"),
        (lambda: load(EG_VALIDATION), "SubscriptionValidationEvent is the subscription handshake"),
    ],
    ids=[
        "storage-write",
        "storage-write-cloudevents",
        "storage-delete",
        "vm-delete",
        "vm-delete-cloudevents",
        "storage-write-failure",
        "vm-write-failure",
        "extension-write",
        "vm-operation-on-extension",
        "status-failed",
        "workspace-resource",
        "subscription-validation",
    ],
)
def test_events_that_are_not_vm_writes_give_nothing_and_say_why(make: Any, why: str) -> None:
    result = from_payload(make(), now=NOW)
    assert result.items == []
    assert len(result.ignored) == 1
    assert result.ignored[0].startswith("event 0: ")
    assert why in result.ignored[0]


def test_spec_placeholder_subscription_is_not_taken_for_a_vm() -> None:
    # the spec's "{subscription-id}" is not a GUID: a VM write naming it must not become a work item
    event = as_vm_write(load(EG_WRITE), resource=VM_ID.replace(SUB, "{subscription-id}"))
    result = from_event_grid(event, now=NOW)
    assert result.items == []
    assert "subscription id is not a GUID" in result.ignored[0]


def test_a_batch_keeps_vm_writes_drops_the_rest_and_dedupes_case_insensitively() -> None:
    batch = [
        as_vm_write(load(EG_WRITE)),
        load(EG_DELETE),
        load(EG_WRITE),
        as_vm_write(load(EG_WRITE), resource=VM_ID.upper().replace("/SUBSCRIPTIONS/", "/subscriptions/")),
        as_vm_write(load(EG_WRITE), resource=OTHER_VM_ID),
    ]
    result = from_event_grid(batch, now=NOW)
    assert targets(result) == [VM_ID, OTHER_VM_ID]
    assert [reason.split(":")[0] for reason in result.ignored] == ["event 1", "event 2", "event 3"]
    assert "already listed (from event 0)" in result.ignored[2]


def test_empty_array_gives_nothing_with_a_reason() -> None:
    result = from_payload([], now=NOW)
    assert result.items == []
    assert result.ignored == ["the payload is an empty array of events"]


def _without(key: str, where: str = "") -> Any:
    event = as_vm_write(load(EG_WRITE))
    del (event["data"] if where == "data" else event)[key]
    return event


def _with(key: str, value: Any, where: str = "") -> Any:
    event = as_vm_write(load(EG_WRITE))
    (event["data"] if where == "data" else event)[key] = value
    return event


def _ce_with(key: str, value: Any) -> Any:
    event = as_cloud_event(as_vm_write(load(EG_WRITE)))
    if value is None:
        del event[key]
    else:
        event[key] = value
    return event


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (42, "$: expected an event object or an array of events, got a number"),
        ("Microsoft.Resources.ResourceWriteSuccess", "got a string"),
        ([None], "$[0]: expected a JSON object, got null"),
        ([{"id": "x", "data": {}}], "$[0]: not an Event Grid event (no eventType) nor a CloudEvent"),
        (_without("id"), "$.id: missing"),
        (_with("id", ""), "$.id: must not be empty"),
        (_with("eventType", 7), "$.eventType: expected a string, got a number"),
        (_with("subject", None), "$.subject: expected a string, got null"),
        (
            _with("data", "Microsoft.Compute/virtualMachines/write"),
            "$.data: expected a JSON object, got a string",
        ),
        (_without("data"), "$.data: expected a JSON object, got null"),
        (_without("operationName", "data"), "$.data.operationName: missing"),
        (_with("operationName", ["x"], "data"), "$.data.operationName: expected a string, got an array"),
        (_with("resourceUri", {"id": VM_ID}, "data"), "$.data.resourceUri: expected a string, got an object"),
        (_with("correlationId", 5, "data"), "$.data.correlationId: expected a string"),
        (_ce_with("specversion", "0.3"), "$.specversion: only CloudEvents 1.0 is supported, got '0.3'"),
        (_ce_with("source", None), "$.source: missing"),
        (_ce_with("type", None), "$.type: missing"),
        (
            [as_vm_write(load(EG_WRITE)), _without("operationName", "data")],
            "$[1].data.operationName: missing",
        ),
    ],
)
def test_malformed_events_raise_naming_the_json_path(payload: Any, message: str) -> None:
    with pytest.raises(IntakeError) as caught:
        from_event_grid(payload, now=NOW)
    assert message in str(caught.value)


def test_resource_uri_and_subject_both_empty_is_malformed() -> None:
    event = _with("resourceUri", "", "data")
    event["subject"] = ""
    with pytest.raises(IntakeError, match=r"\$\.data\.resourceUri: missing, and no subject"):
        from_event_grid(event, now=NOW)


# --- alerts --------------------------------------------------------------------------------------


def test_published_v2_alert_ids_use_a_placeholder_subscription_and_are_refused_with_reasons() -> None:
    result = from_alert(load(ALERT_V2), now=NOW)
    assert result.items == []
    assert len(result.ignored) == 3
    assert "dimension ResourceId" in result.ignored[0]
    assert "alertTargetIDs[0]" in result.ignored[1]
    assert all("subscription id is not a GUID" in reason for reason in result.ignored[:2])
    assert result.ignored[2] == "alert 'AcmeRule': names no VM id and no Computer"


def test_published_v2_alert_with_a_real_subscription_names_its_vms() -> None:
    alert = load(ALERT_V2)
    essentials, criterion = (
        alert["data"]["essentials"],
        alert["data"]["alertContext"]["condition"]["allOf"][0],
    )
    criterion["dimensions"][0]["value"] = criterion["dimensions"][0]["value"].replace(PLACEHOLDER_SUB, SUB)
    essentials["alertTargetIDs"] = [t.replace(PLACEHOLDER_SUB, SUB) for t in essentials["alertTargetIDs"]]
    result = from_payload(alert, now=NOW)
    # the doc sample's dimension (TEST/testvm) and target (ai-engineering/testvm) are two VMs
    assert [str(item.vm_id) for item in result.items] == [
        f"/subscriptions/{SUB}/resourceGroups/TEST/providers/Microsoft.Compute/virtualMachines/testvm",
        f"/subscriptions/{SUB}/resourceGroups/ai-engineering/providers/Microsoft.Compute/virtualMachines/testvm",
    ]
    alert_id = essentials["alertId"]
    for item in result.items:
        assert (item.reason, item.source, item.correlation_id, item.attempt, item.first_seen) == (
            Trigger.ALERT,
            alert_id,
            alert_id,
            0,
            STAMP,
        )
    assert result.ignored == []


@pytest.mark.parametrize("name", ["_ResourceId", "ResourceId", "_resourceid", "RESOURCEID"])
def test_resource_id_dimensions_name_the_vm_whatever_the_case_of_the_name(name: str) -> None:
    result = from_alert(v2_alert(dimensions=[dim(name, VM_ID.lower())], targets=[WORKSPACE_ID]), now=NOW)
    assert [item.vm_id for item in result.items] == [vm(VM_ID)]
    assert any("is a Log Analytics workspace, not a VM" in reason for reason in result.ignored)


def test_vm_ids_are_deduplicated_case_insensitively_across_dimensions_items_and_targets() -> None:
    upper = VM_ID.upper().replace("/SUBSCRIPTIONS/", "/subscriptions/")
    alert = v2_alert(
        dimensions=[dim("_ResourceId", VM_ID.lower()), dim("ResourceId", upper)],
        configuration_items=[VM_ID],
        targets=[VM_ID.lower(), OTHER_VM_ID],
    )
    result = from_alert(alert, now=NOW)
    assert targets(result) == [VM_ID, OTHER_VM_ID]  # rendered canonically
    assert len(result.items) == 2
    assert sum("already listed" in reason for reason in result.ignored) == 3


def test_computer_dimension_alone_gives_a_computer_item() -> None:
    # the current doc's alertContext (Computer dimension) in the published envelope, rule on a workspace
    alert = v2_alert(targets=[WORKSPACE_ID])
    alert["data"].update(load(ALERT_V2_COMPUTER_CONTEXT))
    result = from_payload(alert, now=NOW)
    assert [(item.vm_id, item.computer, item.reason) for item in result.items] == [
        (None, "TestComputer", Trigger.ALERT)
    ]
    assert result.items[0].to_dict()["computer"] == "TestComputer"
    assert len(result.ignored) == 1
    assert "is a Log Analytics workspace" in result.ignored[0]


def test_computer_names_are_deduplicated_case_insensitively() -> None:
    alert = v2_alert(dimensions=[dim("Computer", "TestComputer")], targets=[WORKSPACE_ID])
    allof = alert["data"]["alertContext"]["condition"]["allOf"]
    allof.append({**allof[0], "dimensions": [dim("computer", " testcomputer ")]})
    result = from_alert(alert, now=NOW)
    assert [item.computer for item in result.items] == ["TestComputer"]
    assert any("computer 'testcomputer' is already listed" in reason for reason in result.ignored)


def test_computer_is_dropped_when_the_alert_names_a_vm_by_id() -> None:
    alert = v2_alert(dimensions=[dim("_ResourceId", VM_ID), dim("Computer", "web-01.contoso.com")])
    result = from_alert(alert, now=NOW)
    assert targets(result) == [VM_ID]
    assert any("'web-01.contoso.com' not used: the alert names the VM by id" in r for r in result.ignored)


def test_arc_resource_id_with_a_computer_keeps_the_computer() -> None:
    arc = f"/subscriptions/{SUB}/resourceGroups/onprem/providers/Microsoft.HybridCompute/machines/srv-7"
    alert = v2_alert(dimensions=[dim("_ResourceId", arc), dim("Computer", "srv-7")], targets=[WORKSPACE_ID])
    result = from_alert(alert, now=NOW)
    assert targets(result) == ["computer:srv-7"]
    assert any("HybridCompute/machines/srv-7' is not a virtual machine id" in r for r in result.ignored)


@pytest.mark.parametrize("value", ["", "   ", None, "two words"])
def test_unusable_dimension_values_give_reasons_not_items(value: Any) -> None:
    alert = v2_alert(dimensions=[dim("_ResourceId", value), dim("Computer", value)], targets=[])
    result = from_alert(alert, now=NOW)
    assert result.items == []
    assert len(result.ignored) == 3  # the id, the computer, and the summary


def test_configuration_items_are_used_only_when_they_are_vm_ids() -> None:
    alert = v2_alert(
        dimensions=[], targets=[WORKSPACE_ID], configuration_items=["web-01", VM_ID, WORKSPACE_ID]
    )
    result = from_alert(alert, now=NOW)
    assert targets(result) == [VM_ID]
    assert "configurationItems[0] 'web-01' is not a virtual machine id" in result.ignored[0]
    assert "configurationItems[2]" in result.ignored[1]
    assert "is a Log Analytics workspace" in result.ignored[1]


def test_alert_target_ids_give_the_vm_of_a_resource_centric_rule() -> None:
    result = from_alert(v2_alert(dimensions=[], targets=[VM_ID]), now=NOW)
    assert targets(result) == [VM_ID]
    assert result.ignored == []


def test_metric_alert_sample_resolved_gives_nothing() -> None:
    result = from_payload(load(ALERT_METRIC), now=NOW)
    assert result.items == []
    assert result.ignored == ["alert 'WCUS-R2-Gen2': monitorCondition is 'Resolved'; only Fired alerts act"]


def test_metric_alert_sample_fired_refuses_a_vm_name_and_a_guid_with_reasons() -> None:
    alert = load(ALERT_METRIC)
    alert["data"]["essentials"]["monitorCondition"] = "Fired"
    result = from_alert(alert, now=NOW)
    # its ResourceId dimension is a GUID and its configurationItems a VM name: neither is a VM id
    assert result.items == []
    joined = "\n".join(result.ignored)
    assert "'a0a0a0a0-bbbb-cccc-dddd-e1e1e1e1e1e1' is not a virtual machine id" in joined
    assert "'wcus-r2-gen2' is not a virtual machine id" in joined


@pytest.mark.parametrize("condition", ["Resolved", "resolved"])
def test_resolved_alert_naming_a_vm_does_nothing(condition: str) -> None:
    result = from_alert(v2_alert(dimensions=[dim("_ResourceId", VM_ID)], condition=condition), now=NOW)
    assert result.items == []
    assert "only Fired alerts act" in result.ignored[0]


def test_older_log_analytics_alert_shape_gives_its_computer() -> None:
    # the 2020 doc's "Log Analytics" alertContext in the common-schema envelope, on its workspace
    alert = load(ALERT_V2)
    alert["data"]["essentials"]["monitoringService"] = "Log Analytics"
    v1 = load(ALERT_V1_CONTEXT)
    alert["data"]["essentials"]["alertTargetIDs"] = [v1["alertContext"]["dataSources"][0]["resourceId"]]
    alert["data"].update(v1)
    result = from_payload(alert, now=NOW)
    assert targets(result) == ["computer:INC-Gen2Alert"]
    joined = "\n".join(result.ignored)
    assert "AffectedConfigurationItems[0] 'INC-Gen2Alert' is not a virtual machine id" in joined
    assert "is a Log Analytics workspace" in joined


def test_older_log_analytics_alert_shape_with_a_resource_id_dimension() -> None:
    alert = load(ALERT_V2)
    context = load(ALERT_V1_CONTEXT)["alertContext"]
    context["Dimensions"] = [dim("_ResourceId", VM_ID)]
    alert["data"]["alertContext"] = context
    assert VM_ID in targets(from_alert(alert, now=NOW))


def _alert_with(path: list[str | int], value: Any) -> Any:
    alert = v2_alert(dimensions=[dim("_ResourceId", VM_ID)])
    node = alert
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return alert


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "$: expected a JSON object, got an array"),
        (_alert_with(["schemaId"], "Microsoft.Insights/activityLogs"), "enable the common alert schema"),
        (_alert_with(["data"], KeyError), "$.data: expected a JSON object, got null"),
        (_alert_with(["data", "essentials"], []), "$.data.essentials: expected a JSON object, got an array"),
        (
            _alert_with(["data", "essentials", "monitorCondition"], KeyError),
            "essentials.monitorCondition: missing",
        ),
        (_alert_with(["data", "essentials", "monitorCondition"], True), "expected a string, got a boolean"),
        (
            _alert_with(["data", "essentials", "alertTargetIDs"], VM_ID),
            "alertTargetIDs: expected a JSON array",
        ),
        (_alert_with(["data", "essentials", "alertTargetIDs"], [7]), "alertTargetIDs[0]: expected a string"),
        (_alert_with(["data", "alertContext"], "ctx"), "$.data.alertContext: expected a JSON object"),
        (
            _alert_with(["data", "alertContext", "condition", "allOf"], {}),
            "condition.allOf: expected a JSON array",
        ),
        (
            _alert_with(["data", "alertContext", "condition", "allOf", 0, "dimensions", 0, "value"], 1.5),
            "allOf[0].dimensions[0].value: expected a string, got a number",
        ),
        (
            _alert_with(["data", "alertContext", "condition", "allOf", 0, "dimensions", 0], "x"),
            "allOf[0].dimensions[0]: expected a JSON object",
        ),
        (
            _alert_with(["data", "alertContext", "condition", "allOf", 0, "dimensions", 0, "name"], KeyError),
            "allOf[0].dimensions[0].name: missing",
        ),
    ],
)
def test_malformed_alerts_raise_naming_the_json_path(payload: Any, message: str) -> None:
    with pytest.raises(IntakeError) as caught:
        from_alert(payload, now=NOW)
    assert message in str(caught.value)


def test_max_alert_bytes_is_the_common_schema_limit() -> None:
    assert MAX_ALERT_BYTES == 256 * 1024


# --- Log Analytics rows --------------------------------------------------------------------------


def test_log_rows_give_vm_items_when_resource_id_is_a_vm_else_computer_items() -> None:
    arc = f"/subscriptions/{SUB}/resourceGroups/onprem/providers/Microsoft.HybridCompute/machines/srv-7"
    rows = [
        {"_ResourceId": VM_ID.lower(), "Computer": "web-01"},
        {"_ResourceId": VM_ID, "Computer": "WEB-01"},  # same VM
        {"_ResourceId": arc, "Computer": "srv-7"},
        {"_ResourceId": "", "Computer": "SRV-7"},  # same computer
        {"_ResourceId": None, "Computer": "legacy-box.contoso.com"},
        {"_resourceid": OTHER_VM_ID, "computer": None},  # column names matched case-insensitively
        {"_ResourceId": "", "Computer": ""},
    ]
    result = from_log_rows(rows, now=NOW, source="log-scan:0xC004FD02")
    assert targets(result) == [
        VM_ID,  # rendered canonically
        OTHER_VM_ID,
        "computer:srv-7",
        "computer:legacy-box.contoso.com",
    ]
    for item in result.items:
        assert (item.reason, item.source, item.correlation_id, item.first_seen) == (
            Trigger.LOG_SCAN,
            "log-scan:0xC004FD02",
            "log-scan:0xC004FD02",
            STAMP,
        )
    assert result.ignored == [
        f"row 1: VM {VmId.parse(VM_ID)} is already listed (from row 0)",
        "row 3: computer 'SRV-7' is already listed (from row 2)",
        "row 6: neither a VM _ResourceId ('') nor a computer name ('')",
    ]


def test_published_query_response_gives_its_computers() -> None:
    body = load(LA_RESPONSE)["responses"]["200"]["body"]
    result = from_payload(body, now=NOW)
    # the example has a Computer column but no _ResourceId (its ResourceUri is the workspace)
    assert targets(result) == ["computer:ContosoSQLSrv1", "computer:Store010Web3"]
    assert {item.source for item in result.items} == {"log-analytics:PrimaryResult"}
    assert result.ignored == []


def test_query_response_columns_are_taken_from_the_table() -> None:
    response = {
        "tables": [
            {
                "name": "PrimaryResult",
                "columns": [
                    {"name": "TimeGenerated", "type": "datetime"},
                    {"name": "Computer", "type": "string"},
                    {"name": "_ResourceId", "type": "string"},
                ],
                "rows": [
                    ["2026-11-28T11:00:00Z", "web-01", VM_ID.lower()],
                    ["2026-11-28T11:05:00Z", "arc-1", ""],
                ],
            },
            {"name": "Other", "columns": [{"name": "Count", "type": "long"}], "rows": [[3]]},
        ]
    }
    result = from_payload(response, now=NOW)
    assert targets(result) == [VM_ID, "computer:arc-1"]
    assert result.ignored == ["table 'Other': has neither a _ResourceId nor a Computer column"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"tables": {}}, "$.tables: expected a JSON array, got an object"),
        ({"tables": [{"columns": [], "rows": []}]}, "$.tables[0].name: missing"),
        ({"tables": [{"name": "T", "rows": []}]}, "$.tables[0].columns: expected a JSON array, got null"),
        (
            {"tables": [{"name": "T", "columns": [{"type": "string"}], "rows": []}]},
            "columns[0].name: missing",
        ),
        (
            {"tables": [{"name": "T", "columns": [{"name": "Computer"}], "rows": [["a", "b"]]}]},
            "$.tables[0].rows[0]: 2 values for 1 columns",
        ),
        (
            {"tables": [{"name": "T", "columns": [{"name": "Computer"}], "rows": ["a"]}]},
            "rows[0]: expected a JSON",
        ),
        (
            {"error": {"code": "BadArgumentError", "message": "bad query"}},
            "error response, not data: BadArgumentError",
        ),
    ],
)
def test_malformed_query_responses_raise_naming_the_json_path(payload: Any, message: str) -> None:
    with pytest.raises(IntakeError) as caught:
        from_payload(payload, now=NOW)
    assert message in str(caught.value)


def test_from_log_rows_rejects_a_row_that_is_not_a_mapping() -> None:
    with pytest.raises(IntakeError, match="row 0: expected a mapping"):
        from_log_rows([["web-01"]], now=NOW, source="s")  # type: ignore[list-item]


# --- detection and common rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (None, "$: expected a JSON object or array, got null"),
        (3.5, "got a number"),
        ("text", "got a string"),
        (True, "got a boolean"),
        ({}, "unrecognised payload (top-level keys: none)"),
        (load(ALERT_V2_COMPUTER_CONTEXT), "unrecognised payload (top-level keys: 'alertContext')"),
        ({"WorkspaceId": "x", "SearchResult": {}}, "'WorkspaceId', 'SearchResult'"),
    ],
)
def test_unrecognisable_payloads_raise(payload: Any, message: str) -> None:
    with pytest.raises(IntakeError) as caught:
        from_payload(payload, now=NOW)
    assert message in str(caught.value)


def test_first_seen_is_utc_whatever_the_zone_of_now() -> None:
    paris = NOW.astimezone(timezone(timedelta(hours=1)))
    (item,) = from_event_grid(as_vm_write(load(EG_WRITE)), now=paris).items
    assert item.first_seen == STAMP


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        from_payload([], now=datetime(2026, 11, 28))


def test_items_survive_the_queue_message_round_trip() -> None:
    payloads = [
        [as_vm_write(load(EG_WRITE)), as_cloud_event(as_vm_write(load(EG_WRITE), resource=OTHER_VM_ID))],
        v2_alert(dimensions=[dim("Computer", "TestComputer")], targets=[WORKSPACE_ID]),
        load(LA_RESPONSE)["responses"]["200"]["body"],
    ]
    for payload in payloads:
        for item in from_payload(payload, now=NOW).items:
            assert WorkItem.from_dict(json.loads(json.dumps(item.to_dict()))) == item


# --- property: any JSON-like value gives a result or an IntakeError, never another exception ---
# Random JSON alone almost never gets past the first check, so the payloads are mostly well-formed
# ones of each kind, some with one node replaced by random JSON or deleted.

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
names = st.text(min_size=1, max_size=12)
ids = st.sampled_from(
    [VM_ID, VM_ID.lower(), OTHER_VM_ID, WORKSPACE_ID, "", " ", "TestComputer", VM_ID + "/extensions/x"]
) | st.text(max_size=20)
dimensions = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["_ResourceId", "ResourceId", "Computer", "computer", "IP"]), "value": ids}
    ),
    max_size=3,
)
event_data = st.fixed_dictionaries(
    {
        "operationName": st.sampled_from([VM_WRITE, "Microsoft.Compute/virtualMachines/extensions/write"]),
        "resourceUri": ids,
    },
    optional={"status": st.sampled_from(["Succeeded", "Failed"]), "correlationId": names},
)
eg_events = st.fixed_dictionaries(
    {
        "eventType": st.sampled_from(
            [WRITE_SUCCESS, VALIDATION_EVENT, "Microsoft.Resources.ResourceDeleteSuccess"]
        ),
        "id": names,
        "subject": ids,
        "data": event_data,
    }
)
cloud_events = st.fixed_dictionaries(
    {
        "specversion": st.just("1.0"),
        "type": st.sampled_from([WRITE_SUCCESS, "Microsoft.Resources.ResourceWriteFailure"]),
        "id": names,
        "source": names,
        "data": event_data,
    },
    optional={"subject": ids},
)
alerts = st.fixed_dictionaries(
    {
        "schemaId": st.just(COMMON_ALERT_SCHEMA),
        "data": st.fixed_dictionaries(
            {
                "essentials": st.fixed_dictionaries(
                    {"monitorCondition": st.sampled_from(["Fired", "Fired", "Resolved"])},
                    optional={
                        "alertId": names,
                        "alertRule": names,
                        "alertTargetIDs": st.lists(ids, max_size=3),
                        "configurationItems": st.lists(ids, max_size=3),
                    },
                ),
                "alertContext": st.fixed_dictionaries(
                    {},
                    optional={
                        "condition": st.fixed_dictionaries(
                            {"allOf": st.lists(st.fixed_dictionaries({"dimensions": dimensions}), max_size=2)}
                        ),
                        "Dimensions": dimensions,
                        "AffectedConfigurationItems": st.lists(ids, max_size=2),
                    },
                ),
            }
        ),
    }
)


@st.composite
def query_responses(draw: st.DrawFn) -> dict[str, Any]:
    tables = []
    for _ in range(draw(st.integers(0, 2))):
        columns = draw(st.lists(st.sampled_from(["_ResourceId", "Computer", "TimeGenerated"]), max_size=3))
        rows = draw(st.lists(st.lists(ids, min_size=len(columns), max_size=len(columns)), max_size=3))
        tables.append(
            {"name": draw(names), "columns": [{"name": c, "type": "string"} for c in columns], "rows": rows}
        )
    return {"tables": tables}


well_formed = st.one_of(
    eg_events,
    cloud_events,
    st.lists(st.one_of(eg_events, cloud_events), max_size=3),
    alerts,
    query_responses(),
)


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a node of ``value`` (the root is ``()``)."""
    found = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _nodes(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _nodes(child, (*path, index))
    return found


@st.composite
def corrupted(draw: st.DrawFn) -> Any:
    """A well-formed payload with one node replaced by random JSON, or deleted from its object."""
    payload = draw(well_formed)
    path = draw(st.sampled_from(_nodes(payload)))
    replacement = draw(json_values)
    if not path:
        return replacement
    parent = payload
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return payload


payloads = st.one_of(json_values, well_formed, corrupted())


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_any_json_value_gives_a_result_or_an_intake_error(payload: Any) -> None:
    try:
        result: IntakeResult | None = from_payload(payload, now=NOW)
    except IntakeError as error:
        result, message = None, str(error)
    if result is None:
        assert message.startswith("$")  # every message names the JSON path at fault
        return
    assert isinstance(result, IntakeResult)
    assert all(isinstance(reason, str) and reason for reason in result.ignored)
    seen: set[str] = set()
    for item in result.items:
        assert item.first_seen == STAMP
        assert item.attempt == 0
        key = item.target.casefold()
        assert key not in seen  # never the same VM or computer twice
        seen.add(key)
        assert WorkItem.from_dict(json.loads(json.dumps(item.to_dict()))) == item


@given(st.lists(st.dictionaries(st.sampled_from(["_ResourceId", "Computer", "x"]), json_values), max_size=5))
def test_any_log_rows_give_a_result(rows: list[dict[str, Any]]) -> None:
    result = from_log_rows(rows, now=NOW, source="s")
    assert len(result.items) + len(result.ignored) == len(rows)


# --- the CLI: avma-remediator intake FILE|- --------------------------------------------------------


def run(path: str, stdin_text: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_intake(path, stdin=io.StringIO(stdin_text), stdout=out, stderr=err, now=NOW)
    return code, out.getvalue(), err.getvalue()


def test_cli_prints_the_work_items_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "event.json"
    path.write_text(json.dumps([as_vm_write(load(EG_WRITE))]), encoding="utf-8")
    code, out, err = run(str(path))
    assert (code, err) == (0, "")
    assert json.loads(out) == [
        {
            "reason": "vm-created",
            "vmId": VM_ID,
            "correlationId": "{ID}",
            "source": "4db48cba-50a2-455a-93b4-de41a3b5b7f6",
            "attempt": 0,
            "firstSeen": STAMP,
        }
    ]
    assert out.startswith("[\n  {")  # indented for people


def test_cli_reads_stdin_for_dash() -> None:
    code, out, err = run("-", json.dumps(v2_alert(dimensions=[dim("Computer", "TestComputer")], targets=[])))
    assert (code, err) == (0, "")
    assert [item["computer"] for item in json.loads(out)] == ["TestComputer"]


@pytest.mark.parametrize("sample", [EG_DELETE, EG_FAILURE, EG_VALIDATION, ALERT_METRIC, EG_WRITE])
def test_cli_irrelevant_payload_prints_empty_list_and_reasons(sample: str) -> None:
    code, out, err = run(str(SAMPLES / sample))
    assert code == 0
    assert json.loads(out) == []
    lines = err.splitlines()
    assert lines
    assert all(line.startswith("ignored: ") for line in lines)


def test_cli_uses_the_current_time_when_none_is_given(tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    path.write_text(json.dumps(as_vm_write(load(EG_WRITE))), encoding="utf-8")
    out = io.StringIO()
    before = datetime.now(UTC).replace(microsecond=0)
    assert run_intake(str(path), stdin=io.StringIO(), stdout=out, stderr=io.StringIO()) == 0
    first_seen = datetime.fromisoformat(json.loads(out.getvalue())[0]["firstSeen"])
    assert first_seen.tzinfo is not None
    assert before <= first_seen <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "avma-remediator intake: stdin is not valid JSON: Expecting property name"),
        ("", "is not valid JSON"),
        ("42", "avma-remediator intake: stdin: $: expected a JSON object or array, got a number"),
        ('{"schemaId": "azureMonitorCommonAlertSchema"}', "$.data: expected a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(content: str, message: str) -> None:
    code, out, err = run("-", content)
    assert code == 2
    assert out == ""
    assert message in err


def test_cli_unreadable_file_exits_2(tmp_path: Path) -> None:
    code, out, err = run(str(tmp_path / "missing.json"))
    assert (code, out) == (2, "")
    assert "cannot read" in err
    assert "missing.json" in err
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = run(str(binary))
    assert code == 2
    assert "cannot read" in err
    assert run(str(tmp_path))[0] == 2  # a directory


def test_a_machine_named_in_two_tables_of_a_query_response_is_one_work_item() -> None:
    """Found by the property test: dedupe spans tables, not only rows of one table."""
    table = {"name": "0", "columns": [{"name": "_ResourceId", "type": "string"}], "rows": [[VM_ID]]}
    computers = {
        "name": "1",
        "columns": [{"name": "Computer", "type": "string"}],
        "rows": [["DB-01"], ["db-01"]],
    }
    result = from_payload({"tables": [table, dict(table), computers, dict(computers)]}, now=NOW)
    assert targets(result) == [VM_ID, "computer:DB-01"]
    assert any("already listed" in reason for reason in result.ignored)


# --- issue 9, item 3: hostile ids in events, alerts and log rows are ignored with a reason --------

HOSTILE_VM_ID = VM_ID + "\n/"


def test_an_event_for_a_hostile_id_is_ignored_with_a_reason() -> None:
    result = from_event_grid(as_vm_write(load(EG_WRITE), resource=HOSTILE_VM_ID), now=NOW)
    assert result.items == []
    assert any("whitespace or control" in reason for reason in result.ignored)


def test_an_alert_naming_hostile_ids_and_computers_gives_nothing_for_them() -> None:
    alert = v2_alert(
        dimensions=[dim("_ResourceId", HOSTILE_VM_ID), dim("Computer", "web-01\n")],
        targets=[VM_ID.replace("web-01", "web\x0001")],
    )
    result = from_alert(alert, now=NOW)
    assert result.items == []
    assert any("whitespace or control" in reason for reason in result.ignored)
    assert any("is not a computer name" in reason for reason in result.ignored)


def test_log_rows_with_hostile_ids_and_names_are_ignored_with_a_reason() -> None:
    rows = [
        {"_ResourceId": HOSTILE_VM_ID, "Computer": "web-01\r"},
        {"_ResourceId": "", "Computer": "web\x1b01"},
    ]
    result = from_log_rows(rows, now=NOW, source="s")
    assert result.items == []
    assert len(result.ignored) == 2
    for item in from_log_rows([{"_ResourceId": VM_ID, "Computer": "x"}], now=NOW, source="s\n").items:
        WorkItem.from_dict(json.loads(json.dumps(item.to_dict())))  # what intake emits, the queue accepts


# --- issue 9, item 9: the targets of one alert are capped, the rest recorded by name ---------------


def test_an_alert_naming_more_targets_than_the_cap_queues_the_cap_and_names_the_rest() -> None:
    from shared.intake import MAX_TARGETS_PER_ALERT

    ids = [VM_ID.replace("web-01", f"web-{i:04}") for i in range(MAX_TARGETS_PER_ALERT + 50)]
    alert = v2_alert(dimensions=[], targets=[], configuration_items=ids)
    result = from_alert(alert, now=NOW)  # the default cap
    assert [str(i.vm_id) for i in result.items] == ids[:MAX_TARGETS_PER_ALERT]
    over = [r for r in result.ignored if "over the cap" in r]
    assert len(over) == 50 and all(vm in r for vm, r in zip(ids[MAX_TARGETS_PER_ALERT:], over, strict=True))
    names = v2_alert(dimensions=[dim("Computer", f"host-{i}") for i in range(5)], targets=[])
    capped = from_alert(names, now=NOW, max_targets=2)
    assert [i.computer for i in capped.items] == ["host-0", "host-1"]
    assert sum("over the cap of 2" in r for r in capped.ignored) == 3


# --- evidence time (issue 9): when the evidence itself happened, not when intake saw it ---


def test_an_alert_carries_the_time_it_fired_as_its_evidence_time() -> None:
    result = from_alert(v2_alert(dimensions=[dim("_ResourceId", VM_ID)]), now=NOW)
    # the published sample's essentials.firedDateTime, however late the webhook delivers it
    assert [(i.evidence_at, i.first_seen) for i in result.items] == [("2020-07-09T14:04:49.996450Z", STAMP)]
    started = v2_alert(dimensions=[dim("_ResourceId", VM_ID)])
    del started["data"]["essentials"]["firedDateTime"]
    started["data"]["essentials"]["startDateTime"] = "2026-11-28T12:00:00+01:00"
    assert [i.evidence_at for i in from_alert(started, now=NOW).items] == ["2026-11-28T11:00:00Z"]


@pytest.mark.parametrize(
    ("fired", "evidence"),
    [
        ("2030-01-01T00:00:00Z", "2026-11-28T12:30:05.123456Z"),  # a clock ahead: never after now
        ("yesterday", ""),  # not a time: firstSeen stands in
        (12, ""),
        (None, ""),
    ],
)
def test_an_alert_fired_time_in_the_future_or_unreadable(fired: Any, evidence: str) -> None:
    alert = v2_alert(dimensions=[dim("_ResourceId", VM_ID)])
    alert["data"]["essentials"]["firedDateTime"] = fired
    assert [i.evidence_at for i in from_alert(alert, now=NOW).items] == [evidence]


def test_a_log_row_carries_its_own_time_and_a_machine_named_twice_keeps_the_newest() -> None:
    earlier, later = NOW - timedelta(hours=2), NOW - timedelta(minutes=5)
    rows = [
        {"_ResourceId": VM_ID, "Computer": "web-01", "LastSeen": earlier, "Events": 1},
        {"_ResourceId": VM_ID.lower(), "Computer": "WEB-01", "LastSeen": later, "Events": 3},
        {"_ResourceId": "", "Computer": "srv-7", "TimeGenerated": "2026-11-28T10:00:00Z"},
        {"_ResourceId": OTHER_VM_ID, "Computer": "web-02"},  # no time column: firstSeen stands in
    ]
    result = from_log_rows(rows, now=NOW, source="log-scan")
    assert [(i.target, i.evidence_at) for i in result.items] == [
        (VM_ID, "2026-11-28T12:25:05.123456Z"),
        (OTHER_VM_ID, ""),
        ("computer:srv-7", "2026-11-28T10:00:00Z"),
    ]
    assert all(i.first_seen == STAMP for i in result.items)
    assert WorkItem.from_dict(result.items[0].to_dict()) == result.items[0]


def test_a_vm_write_event_has_no_evidence_time_its_os_disk_decides() -> None:
    result = from_event_grid(as_vm_write(load(EG_WRITE), VM_ID), now=NOW)
    assert [i.evidence_at for i in result.items] == [""]


# --- issue 10, item 15: `intake FILE` on each shipped sample gives its work items, with no editing ---

SHIPPED = Path(__file__).parent.parent / "samples" / "intake"
_BUILT_IN_VM = (
    "/subscriptions/8d41f6b2-95c3-4a8e-b7d0-1c6e2f3a9b54/resourceGroups/rg-migrated-apps"
    "/providers/Microsoft.Compute/virtualMachines/avma-2019-dc"
)
_ALERT_ID = (
    "/subscriptions/8d41f6b2-95c3-4a8e-b7d0-1c6e2f3a9b54/providers/Microsoft.AlertsManagement"
    "/alerts/8d41f6b2-95c3-4a8e-b7d0-1c6e2f3a9b54"
)
_VM_WRITE_ITEM = {
    "reason": "vm-created",
    "vmId": _BUILT_IN_VM,
    "correlationId": "7b1c5a0e-3f0d-4e4b-9d51-0c2a6f8e1d34",
    "source": "4db48cba-50a2-455a-93b4-de41a3b5b7f6",
    "attempt": 0,
    "firstSeen": STAMP,
}
_LOG_ITEM = {
    "reason": "log-scan",
    "correlationId": "log-analytics:PrimaryResult",
    "source": "log-analytics:PrimaryResult",
    "attempt": 0,
    "firstSeen": STAMP,
    "evidenceAt": "2017-08-24T06:59:59Z",
}
SHIPPED_ITEMS: dict[str, list[dict[str, Any]]] = {
    "eventgrid-vm-write.json": [_VM_WRITE_ITEM],
    "cloudevents-vm-write.json": [_VM_WRITE_ITEM],
    "alert-log-v2-resourceid.json": [
        {
            "reason": "alert",
            "vmId": _BUILT_IN_VM,
            "correlationId": _ALERT_ID,
            "source": _ALERT_ID,
            "attempt": 0,
            "firstSeen": STAMP,
            # named twice (dimension and alertTargetIDs): the second mention keeps the fired time
            "evidenceAt": "2020-07-09T14:04:49.996450Z",
        }
    ],
    "alert-log-v2-computer.json": [
        {
            "reason": "alert",
            "computer": "LEGACY-APP01",
            "correlationId": _ALERT_ID,
            "source": _ALERT_ID,
            "attempt": 0,
            "firstSeen": STAMP,
            "evidenceAt": "2020-07-09T14:04:49.996450Z",
        }
    ],
    "loganalytics-query-response.json": [
        {**_LOG_ITEM, "computer": "ContosoSQLSrv1"},
        {**_LOG_ITEM, "computer": "Store010Web3"},
    ],
}


def test_every_shipped_sample_has_its_expected_items() -> None:
    assert sorted(p.name for p in SHIPPED.glob("*.json")) == sorted(SHIPPED_ITEMS)


@pytest.mark.parametrize("name", sorted(SHIPPED_ITEMS))
def test_intake_on_a_shipped_sample_gives_its_work_items(name: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = run_intake(str(SHIPPED / name), stdin=io.StringIO(), stdout=out, stderr=err, now=NOW)
    assert code == 0, err.getvalue()
    assert json.loads(out.getvalue()) == SHIPPED_ITEMS[name]
    # and each item is one the queue worker accepts as it is
    for item in json.loads(out.getvalue()):
        assert WorkItem.from_dict(item).to_dict() == item


def test_the_cli_gives_the_same_items_for_a_shipped_sample(capsys: pytest.CaptureFixture[str]) -> None:
    from shared.cli import main

    assert main(["intake", str(SHIPPED / "eventgrid-vm-write.json")]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in item.items() if k != "firstSeen"} == {
        k: v for k, v in _VM_WRITE_ITEM.items() if k != "firstSeen"
    }


@pytest.mark.parametrize(
    ("name", "what"),
    [
        (ALERT_V2_COMPUTER_CONTEXT, "is only the alertContext of a common-schema alert"),
        (ALERT_V1_CONTEXT, "is only the alertContext of a common-schema alert"),
        (LA_RESPONSE, "is a REST API specification example, not a payload: the response it shows is at"),
    ],
)
def test_a_verbatim_sample_that_is_no_payload_says_what_it_is_and_where_a_whole_one_is(
    name: str, what: str
) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = run_intake(str(SAMPLES / name), stdin=io.StringIO(), stdout=out, stderr=err, now=NOW)
    assert code == 2 and out.getvalue() == ""
    first, second = err.getvalue().splitlines()
    assert "unrecognised payload" in first
    assert second.startswith(f"avma-remediator intake: {SAMPLES / name} {what}")
    assert "samples/intake/" in second
