// avma-remediator: everything `azd provision` (or `az deployment sub create`) deploys.
//
// Subscription scope, in the style of the Azure-Samples Flex Consumption quickstarts: a resource
// group, a user-assigned identity that the Function App uses for everything (storage, Application
// Insights, ARM), identity-based storage with shared keys off, and RBAC in modules with
// deterministic guid() names. What needs the deployed function code (the Event Grid subscription,
// the action group that calls the alert function, the log search alert) is in post/wiring.bicep,
// run by the azd postdeploy hook (scripts/postdeploy.sh / .ps1).
//
// Plain resources only (no registry modules), and only Bicep syntax that pycep-parser 0.7.1 and
// checkov's pycep 0.5.1 both parse: tests/test_infra*.py parse every file and check it.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment: names the resource group and seeds the resource token.')
param environmentName string

// The regions that offer Flex Consumption (Get-AzFunctionAppAvailableLocation -PlanType
// FlexConsumption, as listed by Azure/azure-powershell; tests/data/flex-consumption-regions.json).
@minLength(1)
@description('Region of the resource group and its resources; it must offer the Flex Consumption plan.')
@allowed([
  'australiaeast'
  'australiasoutheast'
  'brazilsouth'
  'canadacentral'
  'canadaeast'
  'centralindia'
  'centralus'
  'eastasia'
  'eastus'
  'eastus2'
  'francecentral'
  'francesouth'
  'germanywestcentral'
  'indonesiacentral'
  'israelcentral'
  'italynorth'
  'japaneast'
  'japanwest'
  'koreacentral'
  'malaysiawest'
  'mexicocentral'
  'newzealandnorth'
  'northcentralus'
  'northeurope'
  'norwayeast'
  'polandcentral'
  'southafricanorth'
  'southcentralus'
  'southeastasia'
  'southindia'
  'spaincentral'
  'swedencentral'
  'switzerlandnorth'
  'switzerlandwest'
  'taiwannorth'
  'taiwannorthwest'
  'uaenorth'
  'uksouth'
  'ukwest'
  'westcentralus'
  'westeurope'
  'westus'
  'westus2'
  'westus3'
])
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('audit: only report what would change (the default; start here). enforce: remediate.')
@allowed([
  'audit'
  'enforce'
])
param remediationMode string = 'audit'

@description('More subscriptions to act on besides this one, comma-separated ids. Each gets the custom role.')
param targetSubscriptionIds string = ''

@description('Sweep this management group instead of the subscriptions. Grant the role there with infra/management-group.bicep (the postdeploy hook does it).')
param managementGroupId string = ''

@description('NCRONTAB schedule of the log scan timer (six fields, seconds first).')
param logScanSchedule string = '0 */15 * * * *'

@description('NCRONTAB schedule of the sweep timer (six fields, seconds first).')
param sweepSchedule string = '0 30 */6 * * *'

@description('Azure cloud of the VMs (default: the cloud deployed to): selects the ARM, Log Analytics and KMS endpoints.')
@allowed([
  'AzureCloud'
  'AzureUSGovernment'
  'AzureChinaCloud'
])
param azureCloud string = environment().name

@description('The sweep skips VMs whose last verdict is younger than this many hours.')
@minValue(0)
@maxValue(8760)
param recheckAfterHours int = 24

@description('A VM carrying this tag (any value but false/no/0) is never touched.')
param optOutTag string = 'avma-remediator-opt-out'

@description('Also move unlicensed KMS clients that point at a custom KMS host to the Azure KMS.')
param allowCustomKmsOverride bool = false

@description('An Event Grid system topic this subscription already has for its resource events (topic type Microsoft.Resources.Subscriptions; a subscription can have only one): the event subscription goes there and no topic is created. It needs a system-assigned identity. Empty: create one.')
param existingSystemTopicName string = ''

@description('Resource group of existingSystemTopicName (in this subscription).')
param existingSystemTopicResourceGroup string = ''

@description('Email address for the app\'s own health alerts (poison and last-resort queues, Event Grid dead letters, failed outcomes, worker exceptions, waiting work). Empty: the alerts fire in Azure Monitor only.')
param alertEmail string = ''

@description('Assign the built-in policy that associates every Windows VM of this subscription with the data collection rule (Azure Monitor Agent must be on the VMs).')
param assignMonitoringPolicies bool = false

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
// Each comma-separated entry, trimmed; an empty one (a trailing comma, ' , ') becomes this
// subscription, which union() then folds into the first entry, so no subscription('') is ever
// deployed to. A loop with a filter or filter() would say it shorter, but pycep cannot parse those.
var extraSubscriptions = [for entry in split(targetSubscriptionIds, ','): empty(trim(entry)) ? toLower(subscription().subscriptionId) : toLower(trim(entry))]
var targetSubscriptions = union([
  toLower(subscription().subscriptionId)
], extraSubscriptions)
var functionAppName = 'func-${resourceToken}'
var deploymentContainerName = 'app-package-${take(functionAppName, 32)}-${take(resourceToken, 7)}'
var deadLetterContainerName = 'eventgrid-deadletter'
// Names the code reads (shared/settings.py WORK_QUEUE, POISON_QUEUE, the LEDGER_TABLE default).
var workQueueName = 'vm-checks'
var poisonQueueName = 'vm-checks-poison'
var ledgerTableName = 'avmaledger'
var resourceGroupName = 'rg-${environmentName}'
var useExistingSystemTopic = !empty(existingSystemTopicName)
var systemTopicName = useExistingSystemTopic ? existingSystemTopicName : 'evgt-${resourceToken}'
var systemTopicResourceGroup = useExistingSystemTopic ? existingSystemTopicResourceGroup : resourceGroupName

resource rg 'Microsoft.Resources/resourceGroups@2024-07-01' = {
  name: resourceGroupName
  location: location
  tags: tags
  properties: {}
}

module identity 'app/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    workspaceName: 'log-${resourceToken}'
    applicationInsightsName: 'appi-${resourceToken}'
    dataCollectionRuleName: 'dcr-avma-spp-${resourceToken}'
    location: location
    tags: tags
    alertEmail: alertEmail
  }
}

module workbook 'app/workbook.bicep' = {
  name: 'workbook'
  scope: rg
  params: {
    location: location
    tags: tags
    applicationInsightsName: monitoring.outputs.applicationInsightsName
  }
}

module healthAlerts 'app/health-alerts.bicep' = {
  name: 'health-alerts'
  scope: rg
  params: {
    location: location
    tags: tags
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    actionGroupId: monitoring.outputs.operatorActionGroupId
    systemTopicName: events.outputs.name
    systemTopicResourceGroup: events.outputs.resourceGroupName
  }
}

module storage 'app/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: deploymentContainerName
    deadLetterContainerName: deadLetterContainerName
    workQueueName: workQueueName
    poisonQueueName: poisonQueueName
    ledgerTableName: ledgerTableName
  }
}

module events 'app/events.bicep' = {
  name: 'events'
  scope: rg
  params: {
    systemTopicName: systemTopicName
    createSystemTopic: !useExistingSystemTopic
    systemTopicResourceGroup: systemTopicResourceGroup
    tags: tags
  }
}

module api 'app/api.bicep' = {
  name: 'api'
  scope: rg
  params: {
    name: functionAppName
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.resourceId
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: deploymentContainerName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    workspaceCustomerId: monitoring.outputs.workspaceCustomerId
    remediationMode: remediationMode
    azureCloud: azureCloud
    targetSubscriptions: join(targetSubscriptions, ',')
    managementGroupId: managementGroupId
    logScanSchedule: logScanSchedule
    sweepSchedule: sweepSchedule
    recheckAfterHours: recheckAfterHours
    optOutTag: optOutTag
    allowCustomKmsOverride: allowCustomKmsOverride
    ledgerTableName: ledgerTableName
  }
}

// The app's identity on the app's own resources only; the topic's identity on the dead-letter container only.
module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    principalId: identity.outputs.principalId
    storageAccountName: storage.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    workspaceName: monitoring.outputs.workspaceName
    deadLetterContainerName: deadLetterContainerName
    systemTopicPrincipalId: events.outputs.principalId
  }
}

// The custom role (read VMs, Run Command, poll its operation) at every target subscription.
module vmAccess 'app/vm-access.bicep' = [for sub in targetSubscriptions: {
  name: 'vm-access-${uniqueString(environmentName, sub)}'
  scope: subscription(sub)
  params: {
    principalId: identity.outputs.principalId
    environmentName: environmentName
  }
}]

module monitoringPolicy 'app/monitoring-policy.bicep' = if (assignMonitoringPolicies) {
  name: 'monitoring-policy-${resourceToken}'
  params: {
    location: location
    dataCollectionRuleId: monitoring.outputs.dataCollectionRuleId
    environmentName: environmentName
  }
}

module monitoringPolicyRoles 'app/subscription-roles.bicep' = if (assignMonitoringPolicies) {
  name: 'monitoring-policy-roles-${resourceToken}'
  params: {
    principalId: assignMonitoringPolicies ? monitoringPolicy!.outputs.principalId : ''
    roleDefinitionIds: assignMonitoringPolicies ? monitoringPolicy!.outputs.roleDefinitionIds : []
  }
}

// Read by azd into the environment, and by the postdeploy hook. Names and ids only: no secrets.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = api.outputs.name
output AZURE_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_LOG_ANALYTICS_WORKSPACE_NAME string = monitoring.outputs.workspaceName
output AZURE_SYSTEM_TOPIC_NAME string = systemTopicName
output AZURE_SYSTEM_TOPIC_RESOURCE_GROUP string = systemTopicResourceGroup
output AZURE_DEAD_LETTER_CONTAINER string = deadLetterContainerName
output AZURE_MANAGEMENT_GROUP_ID string = managementGroupId
output REMEDIATION_MODE string = remediationMode
