"""The Bicep compiler's rules that these templates can break, checked offline (tests/bicep_rules.py).

The rules are read from github.com/Azure/bicep at commit 9beb0fee60ca53458f41492b699af440367b240b
(src/Bicep.Core/Diagnostics/DiagnosticBuilder.cs for the codes, src/Bicep.Core/TypeSystem/
DeployTimeConstant*.cs, Providers/ResourceTypeResolver.cs, Providers/Az/AzResourceTypeProvider.cs,
LanguageConstants.cs and Emit/EmitLimitationCalculator.cs for where and how they apply; see the
module docstring and infra/README.md). No compiler runs here, so every rule is
shown to fire on a one-edit mutant of the real files, and the real files pass every rule.

What matters: `location: workspace.location` on an existing resource (BCP120) made `az deployment
group create` of post/wiring.bicep fail, so the azd postdeploy hook failed and `azd up` stopped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bicep_rules import BicepFile, Checker, Finding, load, parse

INFRA = Path(__file__).resolve().parent.parent / "infra"


def _files() -> dict[str, BicepFile]:
    return load(INFRA)


def _check(files: dict[str, BicepFile], name: str) -> list[Finding]:
    return Checker(files).all(files[name])


def _mutant(name: str, old: str, new: str) -> list[Finding]:
    """The findings on the real templates with one edit in one file."""
    files = _files()
    text = (INFRA / name).read_text(encoding="utf-8")
    if old:
        assert text.count(old) == 1, f"{old!r} is not in {name} exactly once"
        text = text.replace(old, new)
    else:
        text += new
    files[name] = parse(text, name, INFRA / name)
    return _check(files, name)


@pytest.mark.parametrize("name", sorted(_files()))
def test_every_template_passes_the_compiler_rules(name: str) -> None:
    assert [str(f) for f in _check(_files(), name)] == []


def test_the_rules_see_every_template() -> None:
    assert set(_files()) == {p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*.bicep")}


# The edit that broke `azd up`, then one mutant per other rule. (file, old text, new text, code,
# a word the message must contain). An empty old text appends the new text to the file.
MUTANTS = [
    # BCP120: an existing resource's location is not readable at deployment start.
    ("post/wiring.bicep", "  location: location\n  kind: 'LogAlert'", "  location: workspace.location\n  kind: 'LogAlert'", "BCP120", '"location" of workspace'),
    # BCP120: nor a module's outputs in a module's name.
    ("main.bicep", "name: 'identity'", "name: 'identity-${storage.outputs.name}'", "BCP120", '"outputs" of storage'),
    # BCP120 through a variable: a new resource's location is not readable either.
    ("main.bicep", "uniqueString(subscription().id, environmentName, location)", "uniqueString(subscription().id, environmentName, rg.location)", "BCP120", "through resourceToken"),
    # BCP120: a runtime function in a name.
    ("post/wiring.bicep", "'ag-avma-${uniqueString(resourceGroup().id, functionAppName)}'", "'ag-avma-${uniqueString(listKeys(storage.id, '2025-01-01').keys[0].value)}'", "BCP120", "listKeys()"),
    # BCP120: an existing resource named by a runtime value loses its id (ResourceTypeResolver).
    ("app/rbac.bicep", "existing = {\n  name: storageAccountName\n}", "existing = {\n  name: applicationInsights.properties.AppId\n}", "BCP120", '"id" of storage'),
    # BCP120: the whole resource where a string is expected.
    ("post/event-subscription.bicep", "name: eventSubscriptionName", "name: '${systemTopic}'", "BCP120", "whole resource systemTopic"),
    # BCP177: if-condition.
    ("main.bicep", "'app/monitoring-policy.bicep' = if (assignMonitoringPolicies)", "'app/monitoring-policy.bicep' = if (!empty(identity.outputs.principalId))", "BCP177", "if-condition of monitoringPolicy"),
    # BCP178: loop source.
    ("main.bicep", "[for sub in targetSubscriptions:", "[for sub in [identity.outputs.principalId]:", "BCP178", "for-expression of vmAccess"),
    # BCP178: a property loop's source.
    ("post/event-subscription.bicep", "          values: [\n            'Microsoft.Compute/virtualMachines/write'\n          ]", "          values: [for v in systemTopic.properties.topicTypes: v]", "BCP178", "for-expression"),
    # BCP182: a variable's for-body.
    ("post/wiring.bicep", "", "\nvar hosts = [for i in range(0, 2): functionApp.properties.defaultHostName]\noutput hosts array = hosts\n", "BCP182", "for-body of variable hosts"),
    # BCP028 / BCP145 / BCP353: names.
    ("post/wiring.bicep", "", "\nparam functionAppName string\n", "BCP028", "functionAppName"),
    ("post/wiring.bicep", "", "\noutput alertRuleId string = activationErrorAlert.id\n", "BCP145", "alertRuleId"),
    ("post/wiring.bicep", "", "\noutput AlertRuleID string = activationErrorAlert.id\n", "BCP353", "casing"),
    # BCP057: a name that is not declared.
    ("post/wiring.bicep", "deadLetterStorageAccountId: storage.id", "deadLetterStorageAccountId: storageAccount.id", "BCP057", "storageAccount"),
    # Linter no-unused-params / no-unused-vars.
    ("post/wiring.bicep", "", "\nparam unusedThing string = ''\n", "no-unused-params", "unusedThing"),
    ("post/wiring.bicep", "", "\nvar unusedThing = 1\n", "no-unused-vars", "unusedThing"),
    # BCP121: two resources with one name under one parent.
    ("app/storage.bicep", "  parent: queueService\n  name: poisonQueueName", "  parent: queueService\n  name: workQueueName", "BCP121", "workQueue, poisonQueue"),
    # BCP122: two module deployments with one name at one scope.
    ("main.bicep", "name: 'rbac'", "name: 'storage'", "BCP122", "storage, rbac"),
    # BCP179: a loop whose name does not vary.
    ("app/subscription-roles.bicep", "guid(subscription().id, principalId, roleId)", "guid(subscription().id, principalId)", "BCP179", "assignments"),
    # BCP037 / BCP035: module parameters.
    ("main.bicep", "    name: 'id-${resourceToken}'\n", "    name: 'id-${resourceToken}'\n    colour: 'blue'\n", "BCP037", "colour"),
    ("main.bicep", "    systemTopicName: systemTopicName\n    createSystemTopic", "    createSystemTopic", "BCP035", "systemTopicName"),
    # BCP120: the event subscription's module goes to the topic's resource group, which must be
    # known at the start: not read from the topic or the app at deployment time.
    ("post/wiring.bicep", "scope: resourceGroup(systemTopicResourceGroup)", "scope: resourceGroup(functionApp.properties.resourceGroup)", "BCP120", '"scope" of vmWrites'),
    # BCP134: a resource-group module deployed at the subscription.
    ("main.bicep", "  name: 'identity'\n  scope: rg\n", "  name: 'identity'\n  scope: subscription()\n", "BCP134", "identity targets resourceGroup"),
    # BCP053: a module output that the module does not declare.
    ("main.bicep", "output AZURE_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId", "output AZURE_IDENTITY_PRINCIPAL_ID string = identity.outputs.objectId", "BCP053", "objectId"),
    # BCP318: a conditional resource's or module's property read with `.`, even in a ternary on its condition.
    ("app/events.bicep", "createSystemTopic ? systemTopic!.identity", "createSystemTopic ? systemTopic.identity", "BCP318", "systemTopic.identity"),
    ("main.bicep", "monitoringPolicy!.outputs.principalId", "monitoringPolicy.outputs.principalId", "BCP318", "monitoringPolicy.outputs"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "old", "new", "code", "word"), MUTANTS, ids=[f"{m[3]}-{i}" for i, m in enumerate(MUTANTS)]
)
def test_each_rule_catches_its_mutant(name: str, old: str, new: str, code: str, word: str) -> None:
    found = [f for f in _mutant(name, old, new) if f.code == code]
    assert found, f"{code} not raised"
    assert any(word in f.message for f in found), [str(f) for f in found]


def test_readable_properties_are_exactly_id_name_type_and_api_version() -> None:
    """Of a resource: id, name, type, apiVersion; of a module: name (AzResourceTypeProvider.cs,
    LanguageConstants.cs). The wiring's functionApp.id and storage.id inside `properties` are fine:
    `properties` is not a deploy-time-constant container."""
    src = """
param n string
resource a 'Microsoft.Web/sites@2024-04-01' existing = {
  name: n
}
resource ok 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: '${a.name}-${a.id}-${a.type}-${a.apiVersion}'
  location: 'global'
  properties: {
    x: a.properties.defaultHostName
  }
}
resource bad 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: a.kind
  location: 'global'
  tags: {
    t: a.properties.x
  }
}
"""
    f = parse(src, "x.bicep")
    found = Checker({"x.bicep": f}).deploy_time_constants(f)
    assert [(x.code, x.line) for x in found] == [("BCP120", 14), ("BCP120", 17)]


def test_a_deploy_time_value_passes_through_variables_and_functions() -> None:
    src = """
targetScope = 'subscription'
param env string
var token = toLower(uniqueString(subscription().id, env))
var ids = [for s in split(env, ','): empty(trim(s)) ? subscription().subscriptionId : trim(s)]
resource rg 'Microsoft.Resources/resourceGroups@2024-07-01' = {
  name: 'rg-${token}-${length(ids)}'
  location: deployment().location
}
"""
    f = parse(src, "x.bicep")
    assert Checker({"x.bicep": f}).all(f) == []


def test_a_conditional_resource_or_module_is_read_with_a_safe_access_or_an_assertion() -> None:
    """BCP318 (TypeAssignmentVisitor.cs IsPotentiallyDisabledResourceOrModule; commit cc79971cfd):
    `.` on a resource or module whose condition is not literally true warns, a ternary on the same
    condition does not narrow it; `.?`, `!`, the resource's id/name/type/apiVersion and a module's
    name do not warn, nor does a resource that is always deployed."""
    src = """
param c bool
resource t 'Microsoft.EventGrid/systemTopics@2025-02-15' = if (c) {
  name: 'topic'
  location: 'global'
}
resource always 'Microsoft.EventGrid/systemTopics@2025-02-15' = if (true) {
  name: 'other'
  location: 'global'
}
module m 'm.bicep' = if (c) {
  name: 'm'
}
output a string = c ? t.identity.principalId : ''
output b string = t.?identity.principalId ?? ''
output d string = c ? t!.identity.principalId : ''
output e string = '${t.id}${t.name}${t.type}${t.apiVersion}${m.name}${always.identity.principalId}'
output g string = c ? m.outputs.x : ''
"""
    f = parse(src, "x.bicep")
    found = Checker({"x.bicep": f}).null_access(f)
    assert [(x.code, x.line) for x in found] == [("BCP318", 14), ("BCP318", 18)]
