"""The contract between infra/ and the code: settings, queue, table and function names, the log query.

Every setting the code reads is provided by the Function App's app settings in app/api.bicep (or is
listed below as deliberately not set in Azure, with the reason), and every app setting the Bicep
defines is read by the code or by the Functions host. The settings the Bicep gives, with the
template's defaults, pass the engine's own validation. The queues and the table the template
creates are the ones the code uses; the Event Grid subscription and the action group call functions
that exist, on the routes function_app.py declares; the alert looks for what the log scan looks for.
"""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from typing import Any

import shared.intake
import shared.settings
from shared.azure.logs import SPP_QUERY
from shared.settings import POISON_QUEUE, WORK_QUEUE, Settings
from tests.test_infra_lib import ROOT, identifiers, modules, render, resources, template, unwrap

# Read by the code, deliberately not set in Azure.
NOT_IN_AZURE = {
    "AzureWebJobsStorage": "a connection string needs an account key; Azure uses the identity-based "
    "AzureWebJobsStorage__* settings (the code and the host read those)",
    "ARM_ENDPOINT": "derived from AZURE_CLOUD; an override for the simulator",
    "LOG_ANALYTICS_ENDPOINT": "derived from AZURE_CLOUD; an override for the simulator",
    "AZURE_CA_BUNDLE": "the simulator's test CA; Azure endpoints use public certificates",
    "IDENTITY_ENDPOINT": "set by the platform on every Function App with a managed identity",
    "LEASE_SECONDS": "derived from RUN_COMMAND_TIMEOUT_SECONDS unless overridden",
    "AzureFunctionsJobHost__functionTimeout": "host.json's functionTimeout applies in Azure; this app "
    "setting would override it (learn.microsoft.com/azure/azure-functions/functions-host-json)",
}
# Read by the Functions host itself: the identity-based connection named in function_app.py
# (learn.microsoft.com/azure/azure-functions/functions-reference, "Connecting to host storage with an
# identity") and Application Insights with Entra ID (learn.microsoft.com/azure/azure-monitor/app/
# azure-ad-authentication: APPLICATIONINSIGHTS_AUTHENTICATION_STRING).
HOST_CONNECTION_SUFFIXES = (
    "credential",
    "clientId",
    "accountName",
    "blobServiceUri",
    "queueServiceUri",
    "tableServiceUri",
)
# PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: read by the Python worker, which then configures the
# Azure Monitor OpenTelemetry distro itself (learn.microsoft.com/azure/azure-functions/opentelemetry-howto).
HOST_SETTINGS = {
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
    "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY",
}
# Values for settings whose Bicep value is only known at deployment time.
DEPLOY_TIME = {
    "AzureWebJobsStorage__clientId": "11111111-2222-3333-4444-555555555555",
    "AZURE_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
    "AzureWebJobsStorage__blobServiceUri": "https://stexample.blob.core.windows.net/",
    "AzureWebJobsStorage__queueServiceUri": "https://stexample.queue.core.windows.net/",
    "AzureWebJobsStorage__tableServiceUri": "https://stexample.table.core.windows.net/",
    "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "ClientId=11111111-2222-3333-4444-555555555555;Authorization=AAD",
    "LOG_ANALYTICS_WORKSPACE_ID": "66666666-7777-8888-9999-000000000000",
    "TARGET_SUBSCRIPTIONS": "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7",
}


# --- what the code reads -----------------------------------------------------------------------------


def _is_env(node: ast.expr) -> bool:
    """``env``, ``environ`` or ``os.environ``: the mappings the code reads settings from."""
    if isinstance(node, ast.Name):
        return node.id in ("env", "environ")
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


@cache
def code_settings() -> frozenset[str]:
    """Every environment variable name the engine reads: ``get("X")`` in settings.py, ``env.get("X")``,
    ``os.environ.get("X")``, ``os.getenv("X")`` and ``env["X"]`` anywhere in shared/."""
    names: set[str] = set()
    for path in (ROOT / "shared").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and node.args:
                name = _literal(node.args[0])
                func = node.func
                if name is None:
                    continue
                if (
                    (isinstance(func, ast.Name) and func.id == "get" and path.name == "settings.py")
                    or (isinstance(func, ast.Attribute) and func.attr == "get" and _is_env(func.value))
                    or (isinstance(func, ast.Attribute) and func.attr == "getenv")
                ):
                    names.add(name)
            elif isinstance(node, ast.Subscript) and _is_env(node.value):
                name = _literal(node.slice)
                if name is not None:
                    names.add(name)
    return frozenset(names)


@cache
def app_functions() -> dict[str, dict[str, Any]]:
    """function_app.py's functions: name → trigger decorator and its keyword arguments, constants resolved."""
    tree = ast.parse((ROOT / "function_app.py").read_text())
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name)
    }

    def value(node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return constants.get(node.id, getattr(shared.settings, node.id, None))
        if isinstance(node, ast.List):
            return [value(item) for item in node.elts]
        return None

    found: dict[str, dict[str, Any]] = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        name, trigger = None, None
        for decorator in node.decorator_list:
            if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)):
                continue
            if decorator.func.attr == "function_name":
                name = value(decorator.args[0])
            else:
                trigger = {
                    "kind": decorator.func.attr,
                    **{k.arg: value(k.value) for k in decorator.keywords if k.arg},
                }
        if name and trigger:
            found[str(name)] = trigger
    return found


@cache
def host_settings() -> frozenset[str]:
    names = set(HOST_SETTINGS)
    for trigger in app_functions().values():
        for text in trigger.values():
            if isinstance(text, str):
                names.update(re.findall(r"%([A-Za-z0-9_]+)%", text))
        connection = trigger.get("connection")
        if connection:
            names.update(f"{connection}__{suffix}" for suffix in HOST_CONNECTION_SUFFIXES)
    return frozenset(names)


# --- what the Bicep gives ----------------------------------------------------------------------------


def bicep_settings() -> dict[str, Any]:
    site = next(r.body for r in resources("app/api.bicep") if r.symbol == "functionApp")
    return {entry["name"]: entry["value"] for entry in site["properties"]["siteConfig"]["appSettings"]}


def _resolve(value: Any, file: str, caller: tuple[str, dict[str, Any]] | None) -> Any:
    """A Bicep value with what the template itself says followed to a literal: a parameter to what the
    calling module passes (or its default), a variable to its value, ``string(x)``, ``c ? a : b`` and
    ``environment().name`` (the public cloud here). None when only the deployment knows it."""
    if isinstance(value, bool | int) or value is None:
        return value
    if isinstance(value, dict):
        text = render(value)
        if text == "environment().name":
            return "AzureCloud"
        function = value.get("function") or {}
        operator = value.get("operator") or {}
        if function.get("type") == "string":
            (argument,) = [v for v in (function.get("parameters") or {}).values() if v is not None]
            inner = _resolve(argument, file, caller)
            return None if inner is None else str(inner).lower() if isinstance(inner, bool) else str(inner)
        if operator.get("type") == "conditional":
            operands = operator["operands"]
            condition = _resolve(operands["condition"], file, caller)
            if isinstance(condition, bool):
                return _resolve(operands["true_value" if condition else "false_value"], file, caller)
        return None
    if not isinstance(value, str) or "${" in value:
        return None
    tpl = template(file)
    if value not in identifiers(tpl):
        return value
    if value in tpl.get("variables", {}):
        return _resolve(tpl["variables"][value]["value"], file, None)
    if value in tpl.get("parameters", {}):
        if caller is not None and value in caller[1]:
            return _resolve(caller[1][value], caller[0], None)
        return _resolve(tpl["parameters"][value].get("default"), file, None)
    return None


def deployed_env() -> dict[str, str]:
    """The app settings as `azd up` with every default would set them."""
    caller = ("main.bicep", unwrap(modules("main.bicep")["api"]["config"])["params"])
    env: dict[str, str] = {}
    for name, value in bicep_settings().items():
        resolved = _resolve(value, "app/api.bicep", caller)
        if resolved is None:
            env[name] = DEPLOY_TIME[name]
        else:
            env[name] = str(resolved).lower() if isinstance(resolved, bool) else str(resolved)
    return env


# --- settings ----------------------------------------------------------------------------------------


def test_the_scan_finds_the_settings_the_code_reads() -> None:
    """Guard for the AST scan itself: it must see settings from both places that read them."""
    found = code_settings()
    assert {"REMEDIATION_MODE", "TARGET_SUBSCRIPTIONS", "LEDGER_TABLE", "AZURE_CLIENT_ID"} <= found
    assert {"AzureWebJobsStorage__queueServiceUri", "AzureWebJobsStorage__tableServiceUri"} <= found
    assert {"LOG_SCAN_SCHEDULE", "SWEEP_SCHEDULE"} <= host_settings()


def test_every_setting_the_code_reads_is_set_by_the_bicep() -> None:
    missing = code_settings() - set(bicep_settings()) - set(NOT_IN_AZURE)
    assert missing == set(), f"add these to app/api.bicep's app settings: {sorted(missing)}"


def test_every_app_setting_the_bicep_sets_is_read_by_the_code_or_the_host() -> None:
    unread = set(bicep_settings()) - code_settings() - host_settings()
    assert unread == set(), f"nothing reads these app settings: {sorted(unread)}"


def test_the_settings_left_out_of_azure_are_read_and_really_left_out() -> None:
    assert set(NOT_IN_AZURE) <= code_settings() | {"IDENTITY_ENDPOINT"}
    assert set(NOT_IN_AZURE).isdisjoint(bicep_settings())


def test_the_deployed_settings_pass_the_engine_s_validation_in_audit_mode() -> None:
    env = deployed_env()
    settings = Settings.from_env(env)
    assert settings.mode.value == "audit"
    assert settings.queue_service_uri and settings.table_service_uri and settings.storage_client_id
    assert settings.storage_connection is None  # identity-based, no connection string
    assert env["LOG_SCAN_SCHEDULE"] == "0 */15 * * * *" and env["SWEEP_SCHEDULE"] == "0 30 */6 * * *"
    assert env["AzureWebJobsStorage__credential"] == "managedidentity"
    assert settings.opt_out_tag == Settings.from_env({}).opt_out_tag


# --- names -------------------------------------------------------------------------------------------


def test_the_queues_and_the_table_are_the_ones_the_code_uses() -> None:
    variables = template("main.bicep")["variables"]
    assert variables["workQueueName"]["value"] == WORK_QUEUE
    assert variables["poisonQueueName"]["value"] == POISON_QUEUE
    assert variables["ledgerTableName"]["value"] == Settings.from_env({}).ledger_table
    assert deployed_env()["LEDGER_TABLE"] == variables["ledgerTableName"]["value"]
    storage = unwrap(modules("main.bicep")["storage"]["config"])["params"]
    assert (storage["workQueueName"], storage["poisonQueueName"], storage["ledgerTableName"]) == (
        "workQueueName",
        "poisonQueueName",
        "ledgerTableName",
    )
    created = {r.symbol: r.body["name"] for r in resources("app/storage.bicep")}
    assert (created["workQueue"], created["poisonQueue"], created["ledgerTable"]) == (
        "workQueueName",
        "poisonQueueName",
        "ledgerTableName",
    )
    # the queue triggers listen on the same names, over the same identity-based connection
    triggers = {
        t["queue_name"]: t["connection"] for t in app_functions().values() if t["kind"] == "queue_trigger"
    }
    assert triggers == {WORK_QUEUE: "AzureWebJobsStorage", POISON_QUEUE: "AzureWebJobsStorage"}


def test_event_grid_and_the_action_group_call_functions_that_exist() -> None:
    wiring = template("post/wiring.bicep")["variables"]
    functions = app_functions()
    event_function = wiring["eventFunctionName"]["value"]
    alert_function = wiring["alertFunctionName"]["value"]
    assert functions[event_function]["kind"] == "event_grid_trigger"
    assert functions[alert_function]["kind"] == "route"
    assert "POST" in functions[alert_function]["methods"]
    host = json.loads((ROOT / "host.json").read_text())
    prefix = host.get("extensions", {}).get("http", {}).get("routePrefix", "api")
    assert wiring["alertRoute"]["value"] == f"{prefix}/{functions[alert_function]['route']}"
    # the wiring gives its event-subscription module the function's id, which the subscription targets
    given = unwrap(template("post/wiring.bicep")["modules"]["vmWrites"]["config"])["params"]
    assert given["functionResourceId"] == "${functionApp.id}/functions/${eventFunctionName}"
    sub = next(r.body for r in resources("post/event-subscription.bicep") if r.symbol == "vmWrites")
    assert sub["properties"]["destination"]["properties"]["resourceId"] == "functionResourceId"
    # what Event Grid lets through is exactly what the intake turns into work items
    assert sub["properties"]["filter"]["includedEventTypes"] == [shared.intake.WRITE_SUCCESS]
    assert sub["properties"]["filter"]["advancedFilters"][0]["values"] == [shared.intake.VM_WRITE]
    assert sub["properties"]["eventDeliverySchema"] == "EventGridSchema"


def test_the_alert_looks_for_what_the_log_scan_looks_for() -> None:
    alert_query = template("post/wiring.bicep")["variables"]["sppErrorQuery"]["value"]
    scan = [line.strip() for line in SPP_QUERY.splitlines() if not line.startswith("| summarize")]
    alert = [line.strip() for line in alert_query.strip().splitlines()]
    assert alert[:-1] == scan
    # the rule splits by the column the log scan keys VMs by, so each row must carry it
    assert alert[-1] == "| project TimeGenerated, Computer, _ResourceId"
    assert "by _ResourceId, Computer" in SPP_QUERY
    # and the data collection rule feeds that table from that log and provider
    dcr = next(r.body for r in resources("app/monitoring.bicep") if r.symbol == "dataCollectionRule")
    source = dcr["properties"]["dataSources"]["windowsEventLogs"][0]
    assert scan[0] == "Event" and source["streams"] == ["Microsoft-Event"]
    assert 'EventLog == "Application"' in SPP_QUERY and source["xPathQueries"][0].startswith("Application!")
    assert 'Source == "Microsoft-Windows-Security-SPP"' in SPP_QUERY
    assert "Microsoft-Windows-Security-SPP" in source["xPathQueries"][0]


def test_the_sweep_and_log_scan_schedules_reach_the_timers() -> None:
    schedules = {t["schedule"] for t in app_functions().values() if t["kind"] == "timer_trigger"}
    # the last-resort drain runs on a fixed schedule (function_app.py says why)
    assert schedules == {"%LOG_SCAN_SCHEDULE%", "%SWEEP_SCHEDULE%", "0 */10 * * * *"}
    assert {"LOG_SCAN_SCHEDULE", "SWEEP_SCHEDULE"} <= set(bicep_settings())


def test_the_global_workflow_cap_is_flex_instances_times_host_json_queue_concurrency() -> None:
    """MAX_CONCURRENT_WORKFLOWS = maximumInstanceCount × (batchSize + newBatchThreshold), all three agreeing.

    "The maximum number of concurrent messages being processed per function is batchSize plus
    newBatchThreshold" (host.json reference, queues); vm_check scales in its own Flex instances
    (flex-consumption-plan.md, "Per-function scaling"), at most maximumInstanceCount of them, which
    Flex bounds to 40..1,000 (flex-consumption-plan.md, "Considerations": scale).
    """
    host = json.loads((ROOT / "host.json").read_text())
    queues = host["extensions"]["queues"]
    per_instance = queues["batchSize"] + queues["newBatchThreshold"]
    assert queues["batchSize"] <= 32  # the host's maximum
    tpl = template("app/api.bicep")
    site = next(r.body for r in resources("app/api.bicep") if r.symbol == "functionApp")
    count = site["properties"]["functionAppConfig"]["scaleAndConcurrency"]["maximumInstanceCount"]
    # derived, never a literal of its own: the cap divided by what one instance runs
    assert count == {
        "operator": {
            "type": "divide",
            "operands": {"operand_1": "maxConcurrentWorkflows", "operand_2": "queueMessagesPerInstance"},
        }
    }
    variables = {name: entry["value"] for name, entry in tpl["variables"].items()}
    assert variables["queueMessagesPerInstance"] == per_instance
    cap = variables["maxConcurrentWorkflows"]
    assert cap % per_instance == 0, "the cap is not a whole number of instances"
    assert 40 <= cap // per_instance <= 1000
    # the app setting is the same number, and the engine's default agrees
    assert render(bicep_settings()["MAX_CONCURRENT_WORKFLOWS"]) == "string(maxConcurrentWorkflows)"
    assert deployed_env()["MAX_CONCURRENT_WORKFLOWS"] == str(cap)
    assert Settings.from_env({}).max_concurrent_workflows == cap
    assert Settings.from_env(deployed_env()).max_concurrent_workflows == cap
