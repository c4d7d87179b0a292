// The operator's dashboard: an Azure Monitor workbook linked to the app's Application Insights
// (sourceId), in the portal under that resource's Workbooks. Each tile's query is read from
// queries/*.kql with loadTextContent, the one place docs/operations.md and tests/test_workbook.py
// read them too; string() turns the object into the serializedData JSON, which escapes the query
// text correctly (a JSON file with the queries pasted in would be a second copy of each).
//
// Shape: Microsoft.Insights/workbooks@2023-06-01 (tests/data/arm-schemas/2023-06-01/
// Microsoft.Insights.Application.json: name a GUID, kind 'shared', displayName, serializedData and
// category required), serializedData as in Azure/azure-rest-api-specs specification/applicationinsights/
// resource-manager/Microsoft.Insights/stable/2023-06-01/examples/WorkbookManagedAdd.json
// ("version": "Notebook/1.0", "items", "fallbackResourceIds", item type 1 = text); type 3 is a
// query item (content version KqlItem/1.0, queryType 0 = logs, resourceType of what it queries) as
// microsoft/PubSec-Info-Assistant infra/core/logging/monitor.bicep writes them.
param location string
param tags object
param applicationInsightsName string

@description('Time range the tiles open with, in milliseconds (7 days).')
param timeRangeMs int = 604800000

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

var tile = {
  version: 'KqlItem/1.0'
  size: 0
  queryType: 0
  resourceType: 'microsoft.insights/components'
  timeContext: {
    durationMs: timeRangeMs
  }
}

var workbookContent = {
  version: 'Notebook/1.0'
  isLocked: false
  fallbackResourceIds: [
    applicationInsights.id
  ]
  items: [
    {
      type: 1
      name: 'about'
      content: {
        json: '## avma-remediator\nOne record per outcome (`avma-outcome`), per queue probe (`avma-queue`) and per worker exception (`avma-worker-error`); docs/operations.md says what each tile answers and what to do.'
      }
    }
    {
      type: 3
      name: 'outcomes-over-time'
      content: union(tile, {
        title: 'Outcomes over time (VMs per hour)'
        query: loadTextContent('queries/outcomes-over-time.kql')
        visualization: 'timechart'
      })
    }
    {
      type: 3
      name: 'failing-vms'
      content: union(tile, {
        title: 'VMs whose latest outcome is failed, by reason, with the hint'
        query: loadTextContent('queries/failing-vms.kql')
        visualization: 'table'
      })
    }
    {
      type: 3
      name: 'deferred-backlog'
      content: union(tile, {
        title: 'Deferred backlog and its oldest item'
        query: loadTextContent('queries/deferred-backlog.kql')
        visualization: 'table'
      })
    }
    {
      type: 3
      name: 'time-to-remediated'
      content: union(tile, {
        title: 'Minutes from VM creation to remediated (p50, p95)'
        query: loadTextContent('queries/time-to-remediated.kql')
        visualization: 'table'
      })
    }
    {
      type: 3
      name: 'refused-messages'
      content: union(tile, {
        title: 'Poison, malformed and out-of-scope work items'
        query: loadTextContent('queries/refused-messages.kql')
        visualization: 'table'
      })
    }
    {
      type: 3
      name: 'would-remediate'
      content: union(tile, {
        title: 'Audit mode: VMs enforce would re-key (review before switching)'
        query: loadTextContent('queries/would-remediate.kql')
        visualization: 'table'
      })
    }
    {
      type: 3
      name: 'queue-depth'
      content: union(tile, {
        title: 'Queue depth (vm-checks, vm-checks-poison, vm-checks-poison-poison)'
        query: loadTextContent('queries/queue-depth.kql')
        visualization: 'timechart'
      })
    }
    {
      type: 3
      name: 'worker-errors'
      content: union(tile, {
        title: 'Worker exceptions by function and type'
        query: loadTextContent('queries/worker-errors.kql')
        visualization: 'table'
      })
    }
  ]
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, applicationInsightsName, 'avma-remediator-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'avma-remediator operations'
    category: 'workbook'
    sourceId: applicationInsights.id
    version: 'Notebook/1.0'
    serializedData: string(workbookContent)
  }
}

output id string = workbook.id
