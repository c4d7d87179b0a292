// What needs the deployed function code, run by the azd postdeploy hook after `azd deploy`
// (scripts/postdeploy.sh / .ps1), or by hand with `az deployment group create` (README, Deploy):
//
//   - the Event Grid subscription on the subscription's system topic that sends VM writes to the
//     vm_write_event function (the AzureFunction destination is checked against the live function),
//     in post/event-subscription.bicep, deployed into the topic's resource group,
//   - the action group that calls the alert_webhook function with the common alert schema (its URL
//     carries the function's key, which exists only once the function is deployed),
//   - the log search alert for 0xC004FD02, split by _ResourceId, that uses the action group.
//
// Re-running it changes nothing (every name is fixed), so the hook is idempotent.
targetScope = 'resourceGroup'

@description('The Function App (azd output AZURE_FUNCTION_APP_NAME).')
param functionAppName string

@description('The Event Grid system topic of the subscription (azd output AZURE_SYSTEM_TOPIC_NAME).')
param systemTopicName string

@description('Resource group of the system topic (azd output AZURE_SYSTEM_TOPIC_RESOURCE_GROUP): another one when the subscription already had a topic.')
param systemTopicResourceGroup string = resourceGroup().name

@description('The Log Analytics workspace the VMs send their Application log to (AZURE_LOG_ANALYTICS_WORKSPACE_NAME).')
param workspaceName string

// Not workspace.location: a resource's location must be known when the deployment starts, and of
// another resource only id, name, type and apiVersion are (Bicep BCP120; tests/bicep_rules.py).
@description('Region of the log search alert: the region of the workspace (azd output AZURE_LOCATION).')
param location string = resourceGroup().location

@description('The app storage account that holds the dead-letter container (AZURE_STORAGE_ACCOUNT_NAME).')
param storageAccountName string

@description('Container for events Event Grid could not deliver (AZURE_DEAD_LETTER_CONTAINER).')
param deadLetterContainerName string

@description('Severity of the log search alert: 0 critical to 4 verbose.')
@allowed([
  0
  1
  2
  3
  4
])
param alertSeverity int = 3

@description('How often the log search alert runs, and the window it looks at (ISO 8601).')
@allowed([
  'PT5M'
  'PT10M'
  'PT15M'
  'PT30M'
  'PT1H'
])
param alertFrequency string = 'PT15M'

// Must match function_app.py: the Event Grid trigger's and the HTTP trigger's function names and
// the HTTP route (host.json keeps the default "api" route prefix). tests/test_infra_contract.py.
var eventFunctionName = 'vm_write_event'
var alertFunctionName = 'alert_webhook'
var alertRoute = 'api/alerts'
var eventSubscriptionName = (systemTopicResourceGroup =~ resourceGroup().name) ? 'avma-vm-writes' : 'avma-vm-writes-${uniqueString(resourceGroup().id)}'

// The log scan's filter (shared/azure/logs.py SPP_QUERY) without its summarize: one row per event,
// counted per VM by the _ResourceId dimension, which the projection keeps in the result.
// tests/test_infra_contract.py keeps the filters equal.
var sppErrorQuery = '''
Event
| where EventLog == "Application"
| where Source == "Microsoft-Windows-Security-SPP"
| where RenderedDescription contains "0xC004FD02" or EventData contains "0xC004FD02"
| project TimeGenerated, Computer, _ResourceId
'''

resource functionApp 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' existing = {
  name: workspaceName
}

resource storage 'Microsoft.Storage/storageAccounts@2025-01-01' existing = {
  name: storageAccountName
}

// In the topic's resource group, which is not this one when the topic already existed. The name is
// the same on every run; on a topic of another resource group it carries this resource group's
// token, so two deployments that share one topic do not overwrite each other's subscription.
module vmWrites 'event-subscription.bicep' = {
  name: 'avma-vm-writes-${uniqueString(resourceGroup().id)}'
  scope: resourceGroup(systemTopicResourceGroup)
  params: {
    systemTopicName: systemTopicName
    eventSubscriptionName: eventSubscriptionName
    functionResourceId: '${functionApp.id}/functions/${eventFunctionName}'
    deadLetterStorageAccountId: storage.id
    deadLetterContainerName: deadLetterContainerName
  }
}

resource remediatorActionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'ag-avma-${uniqueString(resourceGroup().id, functionAppName)}'
  location: 'global'
  properties: {
    groupShortName: 'avmafix'
    enabled: true
    azureFunctionReceivers: [
      {
        name: 'avma-remediator'
        functionAppResourceId: functionApp.id
        functionName: alertFunctionName
        httpTriggerUrl: 'https://${functionApp.properties.defaultHostName}/${alertRoute}?code=${listKeys('${functionApp.id}/functions/${alertFunctionName}', '2024-04-01').default}'
        useCommonAlertSchema: true
      }
    ]
  }
}

resource activationErrorAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-avma-0xC004FD02-${uniqueString(resourceGroup().id, functionAppName)}'
  location: location
  kind: 'LogAlert'
  properties: {
    displayName: 'Windows activation error 0xC004FD02 (AVMA key on an Azure VM)'
    description: 'A Windows VM logged 0xC004FD02: it carries an AVMA key. avma-remediator checks it and, in enforce mode, moves it to the Azure KMS.'
    severity: alertSeverity
    enabled: true
    scopes: [
      workspace.id
    ]
    evaluationFrequency: alertFrequency
    windowSize: alertFrequency
    criteria: {
      allOf: [
        {
          query: sppErrorQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          dimensions: [
            {
              name: '_ResourceId'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    muteActionsDuration: 'PT1H'
    actions: {
      actionGroups: [
        remediatorActionGroup.id
      ]
    }
  }
}

output eventSubscriptionName string = vmWrites.outputs.name
output actionGroupId string = remediatorActionGroup.id
output alertRuleId string = activationErrorAlert.id
