// The app's own storage account: the Functions host (AzureWebJobsStorage), the Flex Consumption
// deployment package, the work queue and its poison queue, the ledger table, and the container
// Event Grid dead-letters into. Entra ID only: shared-key access is off, so no connection string
// or account key exists anywhere in the deployment.
param name string
param location string
param tags object
param deploymentContainerName string
param deadLetterContainerName string
param workQueueName string
param poisonQueueName string
param ledgerTableName string

// Public endpoint with Entra ID only: a Flex Consumption app without VNet integration reaches its
// storage over the public endpoint. Put the app in a VNet with private endpoints to close it.
resource storage 'Microsoft.Storage/storageAccounts@2025-01-01' = {
  //checkov:skip=CKV_AZURE_35:No VNet integration here, so the Flex Consumption app reaches its storage over the public endpoint; shared keys are off, so every request needs an Entra ID token and a data role.
  //checkov:skip=CKV_AZURE_59:Same as CKV_AZURE_35: the endpoint stays public for an app without VNet integration; authorization is Entra ID only (allowSharedKeyAccess false).
  //checkov:skip=CKV_AZURE_206:LRS on purpose: the queues are transient, deployment packages are rebuilt by azd deploy, and the ledger is rebuilt by the next sweep; geo-replication would only add cost.
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    dnsEndpointType: 'Standard'
    isLocalUserEnabled: false
    minimumTlsVersion: 'TLS1_2'
    publicNetworkAccess: 'Enabled'
    supportsHttpsTrafficOnly: true
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2025-01-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2025-01-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource deadLetterContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2025-01-01' = {
  parent: blobService
  name: deadLetterContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2025-01-01' = {
  parent: storage
  name: 'default'
  properties: {}
}

resource workQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2025-01-01' = {
  parent: queueService
  name: workQueueName
  properties: {
    metadata: {
      purpose: 'avma-remediator work items'
    }
  }
}

resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2025-01-01' = {
  parent: queueService
  name: poisonQueueName
  properties: {
    metadata: {
      purpose: 'work items the Functions host gave up on'
    }
  }
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2025-01-01' = {
  parent: storage
  name: 'default'
  properties: {}
}

resource ledgerTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2025-01-01' = {
  parent: tableService
  name: ledgerTableName
  properties: {}
}

output name string = storage.name
output id string = storage.id
