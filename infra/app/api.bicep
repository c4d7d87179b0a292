// The Flex Consumption plan and the Python 3.11 Function App. The app runs as the user-assigned
// identity for everything: the host's storage (identity-based AzureWebJobsStorage settings), the
// deployment package, Application Insights (Entra ID authentication, local auth off) and ARM
// (AZURE_CLIENT_ID). The app settings below are every setting the code reads (shared/settings.py,
// shared/azure/credentials.py) plus those the host reads; tests/test_infra_contract.py keeps the
// two lists equal.
param name string
param planName string
param location string
param tags object
param identityId string
param identityClientId string
param storageAccountName string
param deploymentContainerName string
param applicationInsightsName string
param workspaceCustomerId string

@allowed([
  'audit'
  'enforce'
])
param remediationMode string
@allowed([
  'AzureCloud'
  'AzureUSGovernment'
  'AzureChinaCloud'
])
param azureCloud string
param targetSubscriptions string
param managementGroupId string
param logScanSchedule string
param sweepSchedule string
param recheckAfterHours int
param optOutTag string
param allowCustomKmsOverride bool
param ledgerTableName string

// Queue messages one instance runs at once: host.json's extensions.queues batchSize (16) plus
// newBatchThreshold (8), "the maximum number of concurrent messages being processed per function"
// (host.json reference). vm_check scales in its own Flex instances (per-function scaling), so at
// most maximumInstanceCount × this many workflows run at once, across every instance. Both numbers
// are checked against host.json and the engine's MAX_CONCURRENT_WORKFLOWS default by
// tests/test_infra_contract.py. Flex allows 40 to 1,000 instances: 960 to 24,000 workflows.
var queueMessagesPerInstance = 24
var maxConcurrentWorkflows = 2400

resource storage 'Microsoft.Storage/storageAccounts@2025-01-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  //checkov:skip=CKV_AZURE_225:Zone redundancy of a Flex Consumption plan exists only in some regions and costs always-ready instances; a missed timer run is caught by the next one and queue messages wait.
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  //checkov:skip=CKV_AZURE_78:Flex Consumption has no FTP endpoint and rejects siteConfig.ftpsState (Flex Consumption plan deprecations, functions-app-settings), so there is nothing to set.
  //checkov:skip=CKV_AZURE_222:Event Grid push delivery and Azure Monitor action groups call the functions over the public endpoint; both HTTP functions need a function key.
  //checkov:skip=CKV_AZURE_17:The only callers, Event Grid and action groups, cannot present client certificates; the HTTP functions require a function key instead.
  //checkov:skip=CKV_AZURE_212:Flex Consumption scales out from zero on demand; the work is in a queue and in timers, so no instance has to stand by for failover.
  //checkov:skip=CKV_AZURE_213:No HTTP health endpoint to probe: the app's HTTP routes need a function key, and the platform restarts failing Flex instances itself.
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
      http20Enabled: true
      appSettings: [
        // The host: identity-based storage connection "AzureWebJobsStorage" (queue triggers, timers,
        // keys), and telemetry with Entra ID. No connection string or key anywhere.
        {
          name: 'AzureWebJobsStorage__credential'
          value: 'managedidentity'
        }
        {
          name: 'AzureWebJobsStorage__clientId'
          value: identityClientId
        }
        {
          name: 'AzureWebJobsStorage__blobServiceUri'
          value: storage.properties.primaryEndpoints.blob
        }
        {
          name: 'AzureWebJobsStorage__queueServiceUri'
          value: storage.properties.primaryEndpoints.queue
        }
        {
          name: 'AzureWebJobsStorage__tableServiceUri'
          value: storage.properties.primaryEndpoints.table
        }
        {
          name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
          value: applicationInsights.properties.ConnectionString
        }
        {
          name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
          value: 'ClientId=${identityClientId};Authorization=AAD'
        }
        // With host.json "telemetryMode": "OpenTelemetry": the Python worker sends its own logs
        // through azure-monitor-opentelemetry (requirements.txt), each log attribute a custom
        // dimension, and the host does not send them a second time (docs/operations.md).
        {
          name: 'PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY'
          value: 'true'
        }
        // The engine (shared/settings.py): identity, mode, scope, cloud, schedules, log scan, ledger.
        {
          name: 'AZURE_CLIENT_ID'
          value: identityClientId
        }
        {
          name: 'REMEDIATION_MODE'
          value: remediationMode
        }
        {
          name: 'AZURE_CLOUD'
          value: azureCloud
        }
        {
          name: 'TARGET_SUBSCRIPTIONS'
          value: targetSubscriptions
        }
        {
          name: 'MANAGEMENT_GROUP_ID'
          value: managementGroupId
        }
        {
          name: 'OPT_OUT_TAG'
          value: optOutTag
        }
        {
          name: 'ALLOW_CUSTOM_KMS_OVERRIDE'
          value: allowCustomKmsOverride ? 'true' : 'false'
        }
        {
          name: 'KMS_HOST'
          value: ''
        }
        {
          name: 'KMS_PORT'
          value: ''
        }
        {
          name: 'LOG_SCAN_SCHEDULE'
          value: logScanSchedule
        }
        {
          name: 'SWEEP_SCHEDULE'
          value: sweepSchedule
        }
        {
          name: 'LOG_ANALYTICS_WORKSPACE_ID'
          value: workspaceCustomerId
        }
        {
          name: 'LOG_SCAN_LOOKBACK_MINUTES'
          value: '60'
        }
        {
          name: 'LOG_SCAN_OVERLAP_MINUTES'
          value: '10'
        }
        {
          name: 'RECHECK_AFTER_HOURS'
          value: string(recheckAfterHours)
        }
        {
          name: 'MAX_CONCURRENCY'
          value: '16'
        }
        {
          name: 'RUN_COMMAND_TIMEOUT_SECONDS'
          value: '900'
        }
        {
          name: 'ARM_CALL_TIMEOUT_SECONDS'
          value: '60'
        }
        {
          name: 'POLL_INTERVAL_SECONDS'
          value: '10'
        }
        {
          name: 'DEFER_DELAY_SECONDS'
          value: '300'
        }
        {
          name: 'DEFER_DEADLINE_HOURS'
          value: '24'
        }
        {
          name: 'MAX_TARGETS_PER_ALERT'
          value: '100'
        }
        {
          name: 'MAX_CONCURRENT_WORKFLOWS'
          value: string(maxConcurrentWorkflows)
        }
        {
          name: 'LEDGER_TABLE'
          value: ledgerTableName
        }
      ]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        // The global cap on concurrent workflows: instances × queue messages each may run at once.
        maximumInstanceCount: maxConcurrentWorkflows / queueMessagesPerInstance
        instanceMemoryMB: 2048
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

output name string = functionApp.name
output id string = functionApp.id
output defaultHostName string = functionApp.properties.defaultHostName
