// Log Analytics (the app's logs and the VMs' Application log), Application Insights with local
// (key-based) authentication off, and the data collection rule that brings the
// Microsoft-Windows-Security-SPP events of Windows VMs into the workspace's Event table, where the
// log scan (shared/azure/logs.py) and the log search alert (post/wiring.bicep) look for 0xC004FD02.
param workspaceName string
param applicationInsightsName string
param dataCollectionRuleName string
param location string
param tags object

@description('Who gets the app\'s own health alerts by email (main.bicep alertEmail, azd env ALERT_EMAIL); empty: the action group has no receiver and the alerts only show in Azure Monitor.')
param alertEmail string = ''

@description('Days the workspace keeps data.')
@minValue(30)
@maxValue(730)
param retentionInDays int = 30

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
    features: {
      disableLocalAuth: true
    }
  }
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: applicationInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    DisableLocalAuth: true
  }
}

// Azure Monitor Agent on a VM sends what this rule selects once the VM is associated with it (the
// built-in policy in monitoring-policy.bicep does that at scale). Stream Microsoft-Event lands in
// the Event table (learn.microsoft.com/azure/azure-monitor/agents/data-collection-windows-events).
resource dataCollectionRule 'Microsoft.Insights/dataCollectionRules@2024-03-11' = {
  name: dataCollectionRuleName
  location: location
  tags: tags
  kind: 'Windows'
  properties: {
    description: 'Software Protection Platform events (Application log) of Windows VMs, for avma-remediator.'
    dataSources: {
      windowsEventLogs: [
        {
          name: 'security-spp-application'
          streams: [
            'Microsoft-Event'
          ]
          xPathQueries: [
            'Application!*[System[Provider[@Name=\'Microsoft-Windows-Security-SPP\']]]'
          ]
        }
      ]
    }
    destinations: {
      logAnalytics: [
        {
          name: 'remediatorWorkspace'
          workspaceResourceId: workspace.id
        }
      ]
    }
    dataFlows: [
      {
        streams: [
          'Microsoft-Event'
        ]
        destinations: [
          'remediatorWorkspace'
        ]
      }
    ]
  }
}

// Where the app's own health alerts go (this rule, and those in health-alerts.bicep): an email to
// the operator, with the common alert schema. Not the action group of post/wiring.bicep, which
// calls the alert_webhook function to check VMs.
resource operatorActionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'ag-avma-ops-${uniqueString(resourceGroup().id, workspaceName)}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'avmaops'
    enabled: true
    emailReceivers: empty(alertEmail) ? [] : [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

// The last-resort queue (vm-checks-poison-poison) holds what the poison handler could not record.
// Queue storage's QueueMessageCount has no per-queue dimension (and an hourly grain), so the rule
// watches the line the poison_drain timer logs at error level whenever that queue held anything,
// or whenever storage was still failing (docs/operations.md, "The last-resort queue"), and pages
// the operator through operatorActionGroup.
resource lastResortQueueAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-avma-last-resort-${uniqueString(resourceGroup().id, workspaceName)}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'avma-remediator: messages in vm-checks-poison-poison'
    description: 'The poison handler could not record some work items; the poison_drain timer recorded them, or could not because storage is still failing.'
    severity: 2
    enabled: true
    scopes: [
      workspace.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: 'AppTraces\n| where Message startswith "last-resort queue " or Message startswith "last-resort drain stopped"'
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        operatorActionGroup.id
      ]
    }
  }
}

output workspaceName string = workspace.name
output workspaceCustomerId string = workspace.properties.customerId
output applicationInsightsName string = applicationInsights.name
output dataCollectionRuleId string = dataCollectionRule.id
output operatorActionGroupId string = operatorActionGroup.id
