// Alerts on the app's own health, to the operator's action group (monitoring.bicep). The log
// alerts query Application Insights (the records of shared/telemetry.py, with their fields as
// customDimensions: docs/operations.md "What is logged"); each query is in queries/ and shown in
// docs/operations.md with what the operator does when it fires. The rule on the last-resort
// queue is in monitoring.bicep (it predates these). Event Grid's dead letters are a platform
// metric of the system topic.
//
// Why log alerts for the queues: Queue storage's QueueMessageCount metric is account-wide, hourly
// and has no queue dimension (Azure Monitor supported metrics, Microsoft.Storage/storageAccounts/
// queueServices), so it cannot watch one queue; the poison_drain timer logs each queue's depth and
// oldest visible message every ten minutes instead (shared/queueprobe.py).
//
// The rule's shape (Microsoft.Insights/scheduledQueryRules@2023-12-01, kind LogAlert): properties
// enabled, criteria and scopes required; each criteria.allOf condition with query, timeAggregation,
// metricMeasureColumn, operator, threshold and failingPeriods (Azure/azure-rest-api-specs
// specification/monitor/resource-manager/Microsoft.Insights/stable/2023-12-01/scheduledQueryRule_API.json,
// definitions ScheduledQueryRuleResource and Condition; Azure/bicep-types-az
// generated/monitor/microsoft.insights/2023-12-01/types.md). tests/test_infra_schemas.py checks it
// against the ARM schema of the same version.
param location string
param tags object
param applicationInsightsName string
param actionGroupId string

@description('The Event Grid system topic that delivers VM writes (events.bicep).')
param systemTopicName string

@description('Resource group of the system topic.')
param systemTopicResourceGroup string

@description('Alert when more distinct VMs than this end failed within an hour.')
@minValue(0)
param failedVmsPerHour int = 10

@description('Alert when the worker and the poison handler raise more than this many exceptions in 15 minutes.')
@minValue(0)
param workerErrorsPer15Minutes int = 5

@description('Alert when the oldest visible message in vm-checks has waited longer than this many minutes.')
@minValue(1)
param oldestMessageMinutes int = 30

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

// Each query ends in one number (metricMeasureColumn), compared with the threshold (operator) every
// 15 minutes over the window. tests/test_workbook.py runs each over recorded records.
var healthRules = [
  {
    key: 'poison'
    displayName: 'avma-remediator: work items reached vm-checks-poison'
    description: 'The worker failed on a work item maxDequeueCount times; the poison handler recorded it as failed: poison. See docs/operations.md, "Alerts".'
    severity: 2
    query: loadTextContent('queries/alert-poison.kql')
    measure: 'items'
    operator: 'GreaterThan'
    threshold: 0
    window: 'PT15M'
  }
  {
    key: 'poison-queue-stuck'
    displayName: 'avma-remediator: vm-checks-poison is not being emptied'
    description: 'Every queue probe for 30 minutes found messages in vm-checks-poison: the poison handler is failing (they will reach vm-checks-poison-poison).'
    severity: 2
    query: loadTextContent('queries/alert-poison-queue-stuck.kql')
    measure: 'least'
    operator: 'GreaterThan'
    threshold: 0
    window: 'PT30M'
  }
  {
    key: 'failed-rise'
    displayName: 'avma-remediator: more VMs failed than usual'
    description: 'More distinct VMs ended failed within an hour than failedVmsPerHour. See the workbook tile of failing VMs for the reasons.'
    severity: 3
    query: loadTextContent('queries/alert-failed-rise.kql')
    measure: 'failedVMs'
    operator: 'GreaterThan'
    threshold: failedVmsPerHour
    window: 'PT1H'
  }
  {
    key: 'worker-errors'
    displayName: 'avma-remediator: worker exceptions'
    description: 'vm_check or vm_check_poison raised more than workerErrorsPer15Minutes exceptions in 15 minutes; the host retries each message.'
    severity: 2
    query: loadTextContent('queries/alert-worker-errors.kql')
    measure: 'errors'
    operator: 'GreaterThan'
    threshold: workerErrorsPer15Minutes
    window: 'PT15M'
  }
  {
    key: 'oldest-message'
    displayName: 'avma-remediator: work waits in vm-checks'
    description: 'The oldest visible message in vm-checks has waited longer than oldestMessageMinutes: the worker is not keeping up, or not running.'
    severity: 2
    query: loadTextContent('queries/alert-oldest-message.kql')
    measure: 'oldestMinutes'
    operator: 'GreaterThan'
    threshold: oldestMessageMinutes
    window: 'PT15M'
  }
  {
    key: 'probe-missing'
    displayName: 'avma-remediator: the queue probe has not run'
    description: 'No avma-queue record for 30 minutes: the poison_drain timer (every 10 minutes) is not running, so the queue alerts above cannot fire either.'
    severity: 2
    query: loadTextContent('queries/alert-probe-missing.kql')
    measure: 'probes'
    operator: 'LessThan'
    threshold: 1
    window: 'PT30M'
  }
  {
    key: 'probe-failing'
    displayName: 'avma-remediator: the queue probe cannot read a queue'
    description: 'Every probe of a queue for 30 minutes (at least two) failed (its avma-queue records carry an error): Queue storage is down or refuses the identity, and the queue alerts above cannot see that queue.'
    severity: 2
    query: loadTextContent('queries/alert-probe-failing.kql')
    measure: 'failingQueues'
    operator: 'GreaterThan'
    threshold: 0
    window: 'PT30M'
  }
]

resource healthAlerts 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = [for rule in healthRules: {
  name: 'alert-avma-${rule.key}-${uniqueString(resourceGroup().id, applicationInsightsName)}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: rule.displayName
    description: rule.description
    severity: rule.severity
    enabled: true
    scopes: [
      applicationInsights.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: rule.window
    criteria: {
      allOf: [
        {
          query: rule.query
          timeAggregation: 'Total'
          metricMeasureColumn: rule.measure
          operator: rule.operator
          threshold: rule.threshold
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
        actionGroupId
      ]
    }
  }
}]

// Events Event Grid gave up delivering to vm_write_event (after its retries) and wrote to the
// dead-letter container: DeadLetteredCount, aggregation Total (MicrosoftDocs/azure-docs
// articles/event-grid/monitor-push-reference.md). On a topic shared with other subscriptions it
// counts their dead letters too (no EventSubscriptionName filter: see docs/operations.md).
resource deadLetterAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'alert-avma-eventgrid-deadletter-${uniqueString(resourceGroup().id, systemTopicName)}'
  location: 'global'
  tags: tags
  properties: {
    description: 'Event Grid dead-lettered VM write events it could not deliver to vm_write_event. See docs/operations.md, "Alerts".'
    severity: 2
    enabled: true
    scopes: [
      resourceId(systemTopicResourceGroup, 'Microsoft.EventGrid/systemTopics', systemTopicName)
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'deadLettered'
          metricNamespace: 'Microsoft.EventGrid/systemTopics'
          metricName: 'DeadLetteredCount'
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
        }
      ]
    }
    autoMitigate: true
    actions: [
      {
        actionGroupId: actionGroupId
      }
    ]
  }
}
