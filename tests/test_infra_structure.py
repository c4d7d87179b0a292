"""The shape of infra/: scopes, module wiring, parameters, role assignments, outputs, and the azd
files around it, read from the Bicep itself through pycep-parser.

What matters: a deployment that a compiler would reject (a module given a parameter it does not
declare, a required one left out, a module at the wrong scope) fails here; every role assignment
has a deterministic name and grants only what is listed below; no output carries a secret; audit is
the default; and `azd up` finds everything it runs.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tree_sitter_powershell
from tree_sitter import Language, Node, Parser

from shared.clouds import CLOUDS
from shared.settings import ConfigError, Settings
from tests import bicep_rules
from tests.test_infra_lib import (
    INFRA,
    ROOT,
    bicep_files,
    decorators,
    function_calls,
    guid_args,
    modules,
    rel,
    render,
    resources,
    target_scope,
    template,
    unescape,
    unwrap,
    walk,
)

HOME = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
SUB_A = "11111111-2222-4333-8444-555555555555"
SUB_B = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"

SCOPES = {
    "main.bicep": "subscription",
    "management-group.bicep": "managementGroup",
    "app/vm-access.bicep": "subscription",
    "app/monitoring-policy.bicep": "subscription",
    "app/subscription-roles.bicep": "subscription",
    "app/api.bicep": "resourceGroup",
    "app/events.bicep": "resourceGroup",
    "app/identity.bicep": "resourceGroup",
    "app/monitoring.bicep": "resourceGroup",
    "app/rbac.bicep": "resourceGroup",
    "app/storage.bicep": "resourceGroup",
    "app/workbook.bicep": "resourceGroup",
    "app/health-alerts.bicep": "resourceGroup",
    "post/wiring.bicep": "resourceGroup",
    "post/event-subscription.bicep": "resourceGroup",
}

# Built-in roles (learn.microsoft.com/azure/role-based-access-control/built-in-roles).
OWNER = "8e3af657-a8ff-443c-a75c-2fe8c4bcb635"
CONTRIBUTOR = "b24988ac-6180-42a0-ab88-20f7382dd24c"
VM_CONTRIBUTOR = "9980e02c-c2be-4d73-94e8-173b1dc7cf3c"
USER_ACCESS_ADMINISTRATOR = "18d7d88d-d35e-4fb5-a5c3-7773c20a72d9"
RBAC_ADMINISTRATOR = "f58310d9-a9f6-439a-9e8d-f62e7b41a168"
BROAD_ROLES = {OWNER, CONTRIBUTOR, VM_CONTRIBUTOR, USER_ACCESS_ADMINISTRATOR, RBAC_ADMINISTRATOR}
STORAGE_BLOB_DATA_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
STORAGE_QUEUE_DATA_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"
STORAGE_TABLE_DATA_CONTRIBUTOR = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"
STORAGE_BLOB_DATA_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
MONITORING_METRICS_PUBLISHER = "3913510d-42f4-4e42-8a64-420c390055eb"
LOG_ANALYTICS_READER = "73c42c96-874c-492b-b04d-ab87d138a893"
MONITORING_CONTRIBUTOR = "749f88d5-cbae-40b8-bcfc-e573ddc772fa"
LOG_ANALYTICS_CONTRIBUTOR = "92aaf0da-9dab-42b6-94a3-d43ce8d16293"
# Built-in policy "Configure Windows Virtual Machines to be associated with a Data Collection Rule or
# a Data Collection Endpoint" 3.5.0: Azure/azure-policy built-in-policies/policyDefinitions/
# Monitoring/AzureMonitor_DCRA_VM_Windows_DINE.json (parameters and roleDefinitionIds read there).
DCRA_POLICY = "244efd75-0d92-453c-b9a3-7d73ca36ed52"
DCRA_POLICY_PARAMETERS = {
    "effect",
    "scopeToSupportedImages",
    "listOfWindowsImageIdToInclude",
    "dcrResourceId",
    "resourceType",
}
DCRA_POLICY_ROLES = {MONITORING_CONTRIBUTOR, LOG_ANALYTICS_CONTRIBUTOR}
# Site properties and app settings the Flex Consumption plan rejects or ignores ("Flex Consumption
# plan deprecations", learn.microsoft.com/azure/azure-functions/functions-app-settings).
FLEX_DEPRECATED_SETTINGS = {
    "FUNCTIONS_EXTENSION_VERSION",
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_WORKER_RUNTIME_VERSION",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTSHARE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_NODE_DEFAULT_VERSION",
    "SCM_DO_BUILD_DURING_DEPLOYMENT",
    "ENABLE_ORYX_BUILD",
}
FLEX_DEPRECATED_SITE_CONFIG = {
    "ftpsState",
    "use32BitWorkerProcess",
    "alwaysOn",
    "windowsFxVersion",
    "linuxFxVersion",
    "preWarmedInstanceCount",
    "functionAppScaleLimit",
    "javaVersion",
    "powerShellVersion",
    "netFrameworkVersion",
}
NCRONTAB = re.compile(r"^\S+( \S+){5}$")  # six fields, seconds first


def res(file: str, symbol: str) -> dict[str, Any]:
    return next(r.body for r in resources(file) if r.symbol == symbol)


def param(file: str, name: str) -> dict[str, Any]:
    return dict(template(file)["parameters"][name])


def app_settings() -> dict[str, Any]:
    site = res("app/api.bicep", "functionApp")
    return {entry["name"]: entry["value"] for entry in site["properties"]["siteConfig"]["appSettings"]}


# --- scopes and module wiring ------------------------------------------------------------------------


def test_every_file_has_its_intended_scope() -> None:
    found = {rel(path): target_scope(template(rel(path))) for path in bicep_files()}
    assert found == SCOPES


def test_no_registry_modules_and_no_bicepparam_files() -> None:
    # registry modules (br/public:...) cannot be fetched or checked here; .bicepparam does not parse
    for file in SCOPES:
        for name, module in modules(file).items():
            assert module["type"] == "local", f"{file}: module {name} is not a local file"
    assert list(INFRA.rglob("*.bicepparam")) == []
    assert "br/public:" not in "".join(path.read_text() for path in bicep_files())


@pytest.mark.parametrize("file", [f for f in SCOPES if template(f).get("modules")])
def test_modules_get_exactly_the_parameters_they_declare(file: str) -> None:
    for name, module in modules(file).items():
        target = (INFRA / file).parent / module["detail"]["path"]
        assert target.is_file(), f"{file}: module {name} points at a missing file"
        declared = template(rel(target)).get("parameters", {})
        given = set(unwrap(module["config"]).get("params", {}))
        required = {p for p, spec in declared.items() if spec.get("default") is None}
        assert given <= set(declared), f"{file}: {name} passes unknown parameters {given - set(declared)}"
        assert required <= given, f"{file}: {name} leaves out required parameters {required - given}"


def test_main_puts_each_module_at_the_scope_its_file_targets() -> None:
    rg_symbols = {r.symbol for r in resources("main.bicep") if r.type == "Microsoft.Resources/resourceGroups"}
    for name, module in modules("main.bicep").items():
        body = unwrap(module["config"])
        scope = target_scope(template(module["detail"]["path"]))
        if scope == "resourceGroup":
            assert body.get("scope") in rg_symbols, f"{name} must deploy into the resource group"
        else:
            assert scope == "subscription", name
            assert body.get("scope") is None or render(body["scope"]).startswith("subscription("), name


def test_the_vm_role_goes_to_every_target_subscription() -> None:
    module = modules("main.bicep")["vmAccess"]
    loop = module["config"]["loop_type"]["detail"]
    body = unwrap(module["config"])
    assert loop["array_name"] == "targetSubscriptions"
    assert render(body["scope"]) == f"subscription({loop['item_name']})"
    targets = render(template("main.bicep")["variables"]["targetSubscriptions"]["value"])
    # this subscription first, then the extra ones from the parameter
    assert targets == "union([to_lower(subscription().subscriptionId)], extraSubscriptions)"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("", [HOME]),
        (f"{SUB_A}", [HOME, SUB_A]),
        (f"{SUB_A},{SUB_B},", [HOME, SUB_A, SUB_B]),  # a trailing comma
        (f" {SUB_A} , , {SUB_B.upper()} ,", [HOME, SUB_A, SUB_B]),  # spaces, an empty entry, case
        (",", [HOME]),
        (f"{HOME},{SUB_A},{SUB_A}", [HOME, SUB_A]),  # this subscription and repeats once each
    ],
)
def test_target_subscriptions_drop_empty_entries(given: str, expected: list[str]) -> None:
    """A trailing comma in TARGET_SUBSCRIPTION_IDS must not deploy to subscription('')."""
    main = bicep_rules.load(INFRA)["main.bicep"]
    value = bicep_rules.evaluate(main, "targetSubscriptions", {"targetSubscriptionIds": given}, HOME)
    assert value == expected


def test_location_is_limited_to_the_flex_consumption_regions() -> None:
    data = json.loads((ROOT / "tests" / "data" / "flex-consumption-regions.json").read_text())
    assert "Get-AzFunctionAppAvailableLocation" in data["source"] and data["read_on"]
    shown = {n.lower().replace(" ", "") for n in data["display_names"] if n not in data["left_out"]}
    assert set(data["regions"]) == shown
    allowed = decorators(param("main.bicep", "location"))["allowed"]
    assert sorted(allowed) == data["regions"]
    assert {"westeurope", "eastus", "swedencentral"} <= set(allowed)
    assert "westindia" not in allowed and "eastus2euap" not in allowed  # no Flex Consumption / canary


def test_the_monitoring_policy_is_only_assigned_when_asked() -> None:
    for name in ("monitoringPolicy", "monitoringPolicyRoles"):
        assert modules("main.bicep")[name]["config"]["condition"] == "assignMonitoringPolicies"


# --- parameters --------------------------------------------------------------------------------------


def test_mode_defaults_to_audit_and_allows_only_the_code_s_modes() -> None:
    for file in ("main.bicep", "app/api.bicep"):
        assert decorators(param(file, "remediationMode"))["allowed"] == ["audit", "enforce"]
    assert param("main.bicep", "remediationMode")["default"] == "audit"
    assert Settings.from_env({"REMEDIATION_MODE": "enforce"}).mode.value == "enforce"


def test_cloud_allows_exactly_the_code_s_clouds_and_defaults_to_the_deployment_s() -> None:
    for file in ("main.bicep", "app/api.bicep"):
        assert sorted(decorators(param(file, "azureCloud"))["allowed"]) == sorted(CLOUDS)
    assert render(param("main.bicep", "azureCloud")["default"]) == "environment().name"


def test_scope_schedule_and_switch_parameters() -> None:
    assert param("main.bicep", "targetSubscriptionIds") | {"decorators": []} == {
        "decorators": [],
        "type": "string",
        "default": "",
    }
    assert param("main.bicep", "managementGroupId")["default"] == ""
    assert param("main.bicep", "assignMonitoringPolicies")["type"] == "bool"
    assert param("main.bicep", "assignMonitoringPolicies")["default"] is False
    assert param("main.bicep", "allowCustomKmsOverride")["default"] is False
    for name in ("logScanSchedule", "sweepSchedule"):
        assert NCRONTAB.match(param("main.bicep", name)["default"]), name


def test_recheck_hours_range_is_the_range_the_code_accepts() -> None:
    limits = decorators(param("main.bicep", "recheckAfterHours"))
    Settings.from_env({"RECHECK_AFTER_HOURS": str(limits["max_value"])})
    Settings.from_env({"RECHECK_AFTER_HOURS": str(limits["min_value"])})
    with pytest.raises(ConfigError):
        Settings.from_env({"RECHECK_AFTER_HOURS": str(limits["max_value"] + 1)})
    assert limits["min_value"] <= param("main.bicep", "recheckAfterHours")["default"] <= limits["max_value"]


def test_every_main_parameter_is_described() -> None:
    for name, spec in template("main.bicep")["parameters"].items():
        assert decorators(spec).get("description"), name


def test_azd_parameters_file_matches_main() -> None:
    given = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    declared = template("main.bicep")["parameters"]
    assert set(given) <= set(declared)
    required = {name for name, spec in declared.items() if spec.get("default") is None}
    assert required <= set(given)
    assert given["environmentName"]["value"] == "${AZURE_ENV_NAME}"
    assert given["location"]["value"] == "${AZURE_LOCATION}"
    # every optional value falls back to the Bicep default when the azd variable is unset
    for name, entry in given.items():
        if name in required:
            continue
        match = re.fullmatch(r"\$\{([A-Z_]+)=(.*)\}", entry["value"])
        assert match, f"{name}: expected ${{VARIABLE=default}}"
        default = declared[name]["default"]
        assert match.group(2) == (str(default).lower() if isinstance(default, bool) else str(default)), name


# --- role assignments --------------------------------------------------------------------------------


ROLE_ASSIGNMENTS = [r for r in resources() if r.type == "Microsoft.Authorization/roleAssignments"]


@pytest.mark.parametrize(
    "assignment", ROLE_ASSIGNMENTS, ids=[f"{r.file}:{r.symbol}" for r in ROLE_ASSIGNMENTS]
)
def test_role_assignment_names_are_guid_of_scope_principal_and_role(assignment: Any) -> None:
    args = guid_args(assignment.body["name"])
    assert args is not None and len(args) == 3, "name must be guid(scope, principal, role)"
    scope, principal, role = args
    props = assignment.body["properties"]
    expected_scope = (
        f"{assignment.body['scope']}.id"
        if "scope" in assignment.body
        else {"subscription": "subscription().id", "managementGroup": "management_group().id"}[
            target_scope(template(assignment.file))
        ]
    )
    assert scope == expected_scope
    assert principal == render(props["principalId"])
    role_id = render(props["roleDefinitionId"])
    assert role_id in (role, f"subscription_resource_id(Microsoft.Authorization/roleDefinitions, {role})")
    assert props["principalType"] == "ServicePrincipal"


def test_role_definitions_have_deterministic_names_and_nothing_is_random() -> None:
    for definition in resources():
        if definition.type == "Microsoft.Authorization/roleDefinitions":
            args = guid_args(definition.body["name"])
            assert args and args[0] in ("subscription().id", "management_group().id")
    text = "".join(path.read_text() for path in bicep_files())
    assert "newGuid(" not in text and "utcNow(" not in text


def _role_ids(file: str) -> dict[str, str]:
    variables = template(file).get("variables", {})
    return {name: spec["value"] for name, spec in variables.items() if isinstance(spec["value"], str)}


def test_the_app_identity_gets_only_data_roles_on_its_own_resources() -> None:
    ids = _role_ids("app/rbac.bicep")
    granted = {
        (render(r.body["properties"]["principalId"]), ids[guid_args(r.body["name"])[2]], r.body["scope"])
        for r in resources("app/rbac.bicep")
        if r.type == "Microsoft.Authorization/roleAssignments"
    }
    assert granted == {
        ("principalId", STORAGE_BLOB_DATA_OWNER, "storage"),
        ("principalId", STORAGE_QUEUE_DATA_CONTRIBUTOR, "storage"),
        ("principalId", STORAGE_TABLE_DATA_CONTRIBUTOR, "storage"),
        ("principalId", MONITORING_METRICS_PUBLISHER, "applicationInsights"),
        ("principalId", LOG_ANALYTICS_READER, "workspace"),
        ("systemTopicPrincipalId", STORAGE_BLOB_DATA_CONTRIBUTOR, "deadLetterContainer"),
    }
    # each scope is the app's own resource, declared `existing` by name from main's outputs
    kinds = {r.symbol: r.type for r in resources("app/rbac.bicep") if r.existing}
    assert kinds == {
        "storage": "Microsoft.Storage/storageAccounts",
        "blobService": "Microsoft.Storage/storageAccounts/blobServices",
        "deadLetterContainer": "Microsoft.Storage/storageAccounts/blobServices/containers",
        "applicationInsights": "Microsoft.Insights/components",
        "workspace": "Microsoft.OperationalInsights/workspaces",
    }
    wiring = unwrap(modules("main.bicep")["rbac"]["config"])["params"]
    assert render(wiring["principalId"]) == "identity.outputs.principalId"
    assert render(wiring["systemTopicPrincipalId"]) == "events.outputs.principalId"


def test_the_monitoring_policy_identity_gets_exactly_what_the_built_in_definition_declares() -> None:
    assignment = res("app/monitoring-policy.bicep", "dcrAssociation")
    ids = _role_ids("app/monitoring-policy.bicep")
    assert render(assignment["properties"]["policyDefinitionId"]).endswith(", dcrAssociationPolicy)")
    assert ids["dcrAssociationPolicy"] == DCRA_POLICY
    assert set(assignment["properties"]["parameters"]) <= DCRA_POLICY_PARAMETERS
    assert assignment["properties"]["parameters"]["scopeToSupportedImages"]["value"] is False
    assert assignment["identity"]["type"] == "SystemAssigned"
    declared = template("app/monitoring-policy.bicep")["outputs"]["roleDefinitionIds"]["value"]
    assert {ids[name] for name in declared} == DCRA_POLICY_ROLES
    wiring = unwrap(modules("main.bicep")["monitoringPolicyRoles"]["config"])["params"]
    assert "monitoringPolicy.outputs.principalId" in render(wiring["principalId"])
    assert "monitoringPolicy.outputs.roleDefinitionIds" in render(wiring["roleDefinitionIds"])


def test_no_broad_role_anywhere() -> None:
    text = "".join(path.read_text() for path in bicep_files()).lower()
    assert [role for role in BROAD_ROLES if role in text] == []


# --- secrets -----------------------------------------------------------------------------------------


def test_no_output_carries_a_secret() -> None:
    for file in SCOPES:
        tpl = template(file)
        secure = {name for name, spec in tpl.get("parameters", {}).items() if "secure" in decorators(spec)}
        for name, output in tpl.get("outputs", {}).items():
            assert not re.search(r"secret|password|key|token|connectionstring|sas", name, re.I), (
                f"{file}: {name}"
            )
            assert function_calls(output["value"], "list_func") == [], f"{file}: {name} calls list*()"
            used = {node for node in walk(output["value"]) if isinstance(node, str)}
            assert used.isdisjoint(secure), f"{file}: {name} exposes a @secure() parameter"


def test_no_key_or_connection_string_in_the_deployment() -> None:
    storage = res("app/storage.bicep", "storage")["properties"]
    assert storage["allowSharedKeyAccess"] is False
    assert storage["minimumTlsVersion"] == "TLS1_2"
    assert storage["allowBlobPublicAccess"] is False
    assert storage["defaultToOAuthAuthentication"] is True
    assert res("app/monitoring.bicep", "applicationInsights")["properties"]["DisableLocalAuth"] is True
    assert res("app/monitoring.bicep", "workspace")["properties"]["features"]["disableLocalAuth"] is True
    text = "".join(path.read_text() for path in bicep_files())
    assert "listKeys(" not in text.replace(
        "listKeys('${functionApp.id}/functions/${alertFunctionName}'", ""
    ), "the only key read is the alert function's, for the action group"
    assert "AccountKey=" not in text


# --- the Function App --------------------------------------------------------------------------------


def test_flex_consumption_python_311_with_the_identity_everywhere() -> None:
    plan = res("app/api.bicep", "plan")
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    site = res("app/api.bicep", "functionApp")
    assert site["kind"] == "functionapp,linux"
    assert site["identity"]["type"] == "UserAssigned"
    config = site["properties"]["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": "3.11"}
    storage = config["deployment"]["storage"]
    assert storage["type"] == "blobContainer"
    assert storage["authentication"] == {
        "type": "UserAssignedIdentity",
        "userAssignedIdentityResourceId": "identityId",
    }
    assert site["properties"]["httpsOnly"] is True
    settings = app_settings()
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert settings["AzureWebJobsStorage__clientId"] == "identityClientId"
    assert settings["AZURE_CLIENT_ID"] == "identityClientId"
    assert (
        settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"]
        == "ClientId=${identityClientId};Authorization=AAD"
    )
    assert "AzureWebJobsStorage" not in settings  # a connection string would need a key
    assert FLEX_DEPRECATED_SETTINGS.isdisjoint(settings)
    assert FLEX_DEPRECATED_SITE_CONFIG.isdisjoint(site["properties"]["siteConfig"])


# --- events, alerts, logs ----------------------------------------------------------------------------


def test_system_topic_on_the_subscription_with_retries_and_dead_lettering() -> None:
    topic = res("app/events.bicep", "systemTopic")
    assert topic["location"] == "global"
    assert topic["properties"]["topicType"] == "Microsoft.Resources.Subscriptions"
    assert render(topic["properties"]["source"]) == "subscription().id"
    assert topic["identity"]["type"] == "SystemAssigned"
    sub = res("post/event-subscription.bicep", "vmWrites")["properties"]
    assert sub["destination"]["endpointType"] == "AzureFunction"
    assert sub["filter"]["includedEventTypes"] == ["Microsoft.Resources.ResourceWriteSuccess"]
    assert sub["filter"]["advancedFilters"] == [
        {
            "operatorType": "StringIn",
            "key": "data.operationName",
            "values": ["Microsoft.Compute/virtualMachines/write"],
        }
    ]
    assert sub["retryPolicy"]["maxDeliveryAttempts"] >= 10
    assert sub["retryPolicy"]["eventTimeToLiveInMinutes"] >= 60
    dead = sub["deadLetterWithResourceIdentity"]
    assert dead["identity"]["type"] == "SystemAssigned"  # the topic's identity: shared keys are off
    assert dead["deadLetterDestination"]["endpointType"] == "StorageBlob"
    assert dead["deadLetterDestination"]["properties"]["blobContainerName"] == "deadLetterContainerName"


ENV = "avma"
EXISTING = {"existingSystemTopicName": "evgt-shared", "existingSystemTopicResourceGroup": "rg-events"}


def _main_value(name: str, params: dict[str, str]) -> object:
    main = bicep_rules.load(INFRA)["main.bicep"]
    return bicep_rules.evaluate(main, name, {"environmentName": ENV, **params}, HOME)


def test_by_default_the_topic_is_created_in_the_app_s_resource_group() -> None:
    assert _main_value("useExistingSystemTopic", {}) is False
    assert _main_value("systemTopicResourceGroup", {}) == f"rg-{ENV}"
    assert render(res("main.bicep", "rg")["name"]) == "resourceGroupName"
    assert render(template("main.bicep")["variables"]["systemTopicName"]["value"]) == (
        "conditional(useExistingSystemTopic, existingSystemTopicName, evgt-${resourceToken})"
    )


def test_an_existing_system_topic_is_used_and_no_topic_is_created() -> None:
    """A subscription has at most one system topic for its resource events: with one named, the
    deployment creates none and wires the event subscription to that one, in its resource group."""
    assert param("main.bicep", "existingSystemTopicName")["default"] == ""
    assert param("main.bicep", "existingSystemTopicResourceGroup")["default"] == ""
    assert _main_value("useExistingSystemTopic", EXISTING) is True
    assert _main_value("systemTopicName", EXISTING) == "evgt-shared"
    assert _main_value("systemTopicResourceGroup", EXISTING) == "rg-events"
    # main gives the events module what it evaluates to
    main = bicep_rules.load(INFRA)["main.bicep"]
    given = bicep_rules.module_params(main, "events", {"environmentName": ENV, **EXISTING}, HOME)
    assert {k: given[k] for k in ("systemTopicName", "createSystemTopic", "systemTopicResourceGroup")} == {
        "systemTopicName": "evgt-shared",
        "createSystemTopic": False,
        "systemTopicResourceGroup": "rg-events",
    }
    # the events module creates the topic only when asked, and otherwise reads the named one there
    (created,) = [r for r in resources("app/events.bicep") if not r.existing]
    assert created.type == "Microsoft.EventGrid/systemTopics"
    assert created.wrapper.get("condition") == "createSystemTopic"
    (used,) = [r for r in resources("app/events.bicep") if r.existing]
    assert used.type == created.type
    assert used.body["name"] == "systemTopicName"
    assert render(used.body["scope"]) == "resource_group(systemTopicResourceGroup)"
    outputs = template("app/events.bicep")["outputs"]
    assert render(outputs["principalId"]["value"]) == (
        "conditional(createSystemTopic, systemTopic.identity.principalId,"
        " existingSystemTopic.identity.principalId)"
    )
    assert outputs["resourceGroupName"]["value"] == "systemTopicResourceGroup"
    # azd gets the topic and its resource group, for the postdeploy hook
    main_outputs = template("main.bicep")["outputs"]
    assert main_outputs["AZURE_SYSTEM_TOPIC_NAME"]["value"] == "systemTopicName"
    assert main_outputs["AZURE_SYSTEM_TOPIC_RESOURCE_GROUP"]["value"] == "systemTopicResourceGroup"
    given_azd = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert given_azd["existingSystemTopicName"]["value"] == "${EXISTING_SYSTEM_TOPIC_NAME=}"
    assert (
        given_azd["existingSystemTopicResourceGroup"]["value"] == "${EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP=}"
    )


def test_the_event_subscription_is_made_in_the_topic_s_resource_group() -> None:
    """A child resource cannot be declared under a parent of another resource group (BCP165): the
    wiring deploys the event subscription as a module scoped to the topic's resource group."""
    assert not [r for r in resources("post/wiring.bicep") if r.type.startswith("Microsoft.EventGrid/")]
    module = modules("post/wiring.bicep")["vmWrites"]
    assert module["detail"]["path"] == "event-subscription.bicep"
    body = unwrap(module["config"])
    assert render(body["scope"]) == "resource_group(systemTopicResourceGroup)"
    assert body["params"]["systemTopicName"] == "systemTopicName"
    assert render(body["params"]["deadLetterStorageAccountId"]) == "storage.id"
    assert (
        render(param("post/wiring.bicep", "systemTopicResourceGroup")["default"]) == "resource_group().name"
    )
    (topic,) = [r for r in resources("post/event-subscription.bicep") if r.existing]
    assert topic.type == "Microsoft.EventGrid/systemTopics" and topic.body["name"] == "systemTopicName"
    assert "scope" not in topic.body  # the module's own resource group, the topic's
    sub = res("post/event-subscription.bicep", "vmWrites")
    assert sub["parent"] == "systemTopic"
    # on a topic of another resource group the name carries this resource group's token, so two
    # deployments that share one topic keep one event subscription each
    name = render(template("post/wiring.bicep")["variables"]["eventSubscriptionName"]["value"])
    assert "avma-vm-writes-${uniqueString(resourceGroup().id)}" in name


def test_log_alert_splits_by_resource_and_calls_the_function_with_the_common_schema() -> None:
    rule = res("post/wiring.bicep", "activationErrorAlert")
    assert rule["kind"] == "LogAlert"
    condition = rule["properties"]["criteria"]["allOf"][0]
    assert condition["dimensions"] == [{"name": "_ResourceId", "operator": "Include", "values": ["*"]}]
    assert render(rule["properties"]["scopes"]) == "[workspace.id]"
    assert render(rule["properties"]["actions"]["actionGroups"]) == "[remediatorActionGroup.id]"
    group = res("post/wiring.bicep", "remediatorActionGroup")["properties"]
    (receiver,) = group["azureFunctionReceivers"]
    assert receiver["useCommonAlertSchema"] is True
    assert receiver["functionName"] == "alertFunctionName"


def test_the_data_collection_rule_sends_spp_events_of_the_application_log_to_the_workspace() -> None:
    dcr = res("app/monitoring.bicep", "dataCollectionRule")
    assert dcr["kind"] == "Windows"
    (source,) = dcr["properties"]["dataSources"]["windowsEventLogs"]
    assert [unescape(q) for q in source["xPathQueries"]] == [
        "Application!*[System[Provider[@Name='Microsoft-Windows-Security-SPP']]]"
    ]
    assert source["streams"] == ["Microsoft-Event"]  # lands in the Event table the log scan reads
    destinations = {d["name"] for d in dcr["properties"]["destinations"]["logAnalytics"]}
    (flow,) = dcr["properties"]["dataFlows"]
    assert flow["streams"] == ["Microsoft-Event"] and set(flow["destinations"]) == destinations
    assert (
        render(dcr["properties"]["destinations"]["logAnalytics"][0]["workspaceResourceId"]) == "workspace.id"
    )


# --- azd: azure.yaml, the hook scripts -----------------------------------------------------------------


def _yaml_lines() -> list[str]:
    return [line.rstrip() for line in (ROOT / "azure.yaml").read_text().splitlines() if line.strip()]


def test_azure_yaml_deploys_this_repository_as_a_python_function_with_bicep() -> None:
    lines = _yaml_lines()
    for expected in (
        "name: avma-remediator",
        "  provider: bicep",
        "  path: infra",
        "  module: main",
        "  api:",
        "    project: .",
        "    language: python",
        "    host: function",
        "  postdeploy:",
    ):
        assert expected in lines, expected
    runs = [line.split("run:", 1)[1].strip() for line in lines if line.strip().startswith("run:")]
    assert runs == [
        "./scripts/preprovision.sh",
        "./scripts/preprovision.ps1",
        "./scripts/postdeploy.sh",
        "./scripts/postdeploy.ps1",
    ]
    for run in runs:
        assert (ROOT / run).is_file()
    assert (ROOT / "function_app.py").is_file() and (ROOT / "requirements.txt").is_file()


def _script_parameters(text: str) -> set[str]:
    """The NAME=value pairs after each ``--parameters`` of an ``az deployment`` call."""
    blocks = re.findall(r"--parameters(.*?)--output", text, re.S)
    return {name for block in blocks for name in re.findall(r"\b([A-Za-z]+)=", block)}


@pytest.mark.parametrize("script", ["postdeploy.sh", "postdeploy.ps1"])
def test_hook_passes_each_template_exactly_its_parameters(script: str) -> None:
    text = (ROOT / "scripts" / script).read_text()
    for template_file in ("post/wiring.bicep", "management-group.bicep"):
        assert template_file.split("/")[-1] in text
    declared = set(template("post/wiring.bicep")["parameters"]) | set(
        template("management-group.bicep")["parameters"]
    )
    required = {
        name
        for file in ("post/wiring.bicep", "management-group.bicep")
        for name, spec in template(file)["parameters"].items()
        if spec.get("default") is None
    }
    given = _script_parameters(text)
    assert required <= given
    assert given <= declared


@pytest.mark.parametrize("script", ["postdeploy.sh", "postdeploy.ps1"])
def test_hook_reads_only_what_main_outputs_or_azd_provides(script: str) -> None:
    text = (ROOT / "scripts" / script).read_text()
    used = set(re.findall(r"\b(AZURE_[A-Z_]+|REMEDIATION_MODE)\b", text))
    outputs = set(template("main.bicep")["outputs"])
    azd_builtins = {"AZURE_ENV_NAME", "AZURE_SUBSCRIPTION_ID"}
    assert used - outputs - azd_builtins == set()


def test_sh_hook_is_valid_posix_sh_and_stops_on_errors() -> None:
    script = ROOT / "scripts" / "postdeploy.sh"
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True, check=False).returncode == 0
    assert "set -eu" in script.read_text()


def _errors(node: Node) -> list[str]:
    found = [f"{node.type} at {node.start_point}"] if node.type == "ERROR" or node.is_missing else []
    for child in node.children:
        found += _errors(child)
    return found


def test_pwsh_hook_parses_and_stops_on_errors() -> None:
    script = ROOT / "scripts" / "postdeploy.ps1"
    tree = Parser(Language(tree_sitter_powershell.language())).parse(script.read_bytes())
    assert _errors(tree.root_node) == []
    text = script.read_text()
    assert "$ErrorActionPreference = 'Stop'" in text
    # each deployment, and the sign-in check (`az account show`) before everything
    assert text.count("$LASTEXITCODE -ne 0") == len(re.findall(r"^\s*az deployment", text, re.M)) + 1 == 3


def test_infra_readme_lists_every_bicep_file() -> None:
    text = (INFRA / "README.md").read_text()
    missing = [rel(path) for path in bicep_files() if rel(path) not in text]
    assert missing == []


def test_every_template_file_is_reached() -> None:
    """main.bicep reaches every app/ module; the hook reaches the other two top-level files."""
    reached = {"main.bicep", "post/wiring.bicep", "management-group.bicep"}
    frontier = sorted(reached)
    while frontier:
        file = frontier.pop()
        for module in modules(file).values():
            target = rel((INFRA / file).parent / module["detail"]["path"])
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert {rel(p) for p in bicep_files()} == reached
    assert Path(INFRA / "main.parameters.json").is_file()


def test_readme_deploy_section_uses_what_the_templates_declare() -> None:
    readme = (ROOT / "README.md").read_text()
    deploy = readme.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
    # `azd env set X` only works for the variables main.parameters.json reads (or azd's own)
    given = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    variables = {re.match(r"\$\{([A-Z_]+)", entry["value"]).group(1) for entry in given.values()}  # type: ignore[union-attr]
    assert set(re.findall(r"azd env set ([A-Z_]+)", deploy)) <= variables
    # the manual wiring command passes what the hook passes: every required parameter, and the
    # topic's resource group and the alert's region, whose defaults are not always right
    manual = deploy.split("az deployment group create", 1)[1].split("```", 1)[0]
    wiring = {
        n for n, spec in template("post/wiring.bicep")["parameters"].items() if spec.get("default") is None
    }
    hook = (ROOT / "scripts" / "postdeploy.sh").read_text().split('/post/wiring.bicep"', 1)[1]
    passed = _script_parameters(hook.split("--output", 1)[0] + "--output")
    assert wiring | {"systemTopicResourceGroup", "location"} <= passed
    assert set(re.findall(r"\b([a-zA-Z]+)=<", manual)) == passed
    main_required = {
        n for n, spec in template("main.bicep")["parameters"].items() if spec.get("default") is None
    }
    manual_main = deploy.split("az deployment sub create", 1)[1].split("\n", 2)[1]
    assert set(re.findall(r"\b([a-zA-Z]+)=", manual_main)) == main_required


def _grants(actions: list[str], wanted: str) -> bool:
    return any(re.fullmatch(re.escape(a).replace(r"\*", ".*"), wanted, re.I) for a in actions)


def test_readme_names_rights_that_can_create_the_custom_role() -> None:
    """The deployment writes role definitions (vm-access.bicep, management-group.bicep) and role
    assignments: the roles the README says are enough must grant both (built-in role definitions
    in tests/data/builtin-roles.json, from MicrosoftDocs/azure-docs)."""
    kinds = {r.type for r in resources()}
    assert {"Microsoft.Authorization/roleDefinitions", "Microsoft.Authorization/roleAssignments"} <= kinds
    needed = [
        "Microsoft.Authorization/roleDefinitions/write",
        "Microsoft.Authorization/roleAssignments/write",
    ]
    roles = json.loads((ROOT / "tests" / "data" / "builtin-roles.json").read_text())["roles"]
    deploy = (ROOT / "README.md").read_text().split("## Deploy", 1)[1].split("\n## ", 1)[0]
    text = " ".join(deploy.split())
    assert "**Owner**, or **Contributor and User Access Administrator**, on each target subscription" in text
    assert "on that management group" in text
    for role in ("Owner", "User Access Administrator"):
        assert all(_grants(roles[role]["actions"], action) for action in needed), role
    rbac_admin = roles["Role Based Access Control Administrator"]["actions"]
    assert not _grants(rbac_admin, needed[0])
    assert "Role Based Access Control Administrator is not enough" in text
    assert text.count("Role Based Access Control Administrator") == 1


def test_the_action_group_key_is_the_alert_function_s_own_and_its_readers_are_documented() -> None:
    """The httpTriggerUrl (a plain, required string in the ARM schema) carries the key; the
    security doc says exactly who can read it and what it opens."""
    (group,) = [r for r in resources("post/wiring.bicep") if r.type == "Microsoft.Insights/actionGroups"]
    (receiver,) = group.body["properties"]["azureFunctionReceivers"]
    url = render(receiver["httpTriggerUrl"])
    assert "/functions/" in url and "alertFunctionName" in url, url
    assert receiver["functionName"] == "alertFunctionName"
    schema = json.loads((ROOT / "tests/data/arm-schemas/2023-01-01/Microsoft.Insights.json").read_text())
    prop = schema["definitions"]["AzureFunctionReceiver"]["properties"]["httpTriggerUrl"]
    assert prop == {"description": "The http trigger url where http request sent to.", "type": "string"}
    doc = " ".join((ROOT / "docs" / "security.md").read_text().split())
    assert "## The alert function's key in the action group" in (ROOT / "docs" / "security.md").read_text()
    for needed in ("Microsoft.Insights/actionGroups/read", "Reader, Monitoring Reader", "rotate the key"):
        assert needed in doc, needed
