// The Event Grid subscription on the subscription's system topic that sends VM writes to the
// vm_write_event function, with retries and dead-lettering. A module of post/wiring.bicep, deployed
// into the topic's resource group: the topic is this subscription's own (main.bicep creates it in
// the app's resource group) or one that already existed, possibly elsewhere (existingSystemTopicName),
// and a child resource can only be declared in its parent's resource group.
targetScope = 'resourceGroup'

@description('The Event Grid system topic of the subscription, in this resource group.')
param systemTopicName string

@description('Name of the event subscription.')
param eventSubscriptionName string

@description('Resource id of the vm_write_event function (<function app id>/functions/vm_write_event).')
param functionResourceId string

@description('Resource id of the storage account that holds the dead-letter container.')
param deadLetterStorageAccountId string

@description('Container for events Event Grid could not deliver.')
param deadLetterContainerName string

resource systemTopic 'Microsoft.EventGrid/systemTopics@2025-02-15' existing = {
  name: systemTopicName
}

resource vmWrites 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2025-02-15' = {
  parent: systemTopic
  name: eventSubscriptionName
  properties: {
    eventDeliverySchema: 'EventGridSchema'
    destination: {
      endpointType: 'AzureFunction'
      properties: {
        resourceId: functionResourceId
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    filter: {
      includedEventTypes: [
        'Microsoft.Resources.ResourceWriteSuccess'
      ]
      advancedFilters: [
        {
          operatorType: 'StringIn'
          key: 'data.operationName'
          values: [
            'Microsoft.Compute/virtualMachines/write'
          ]
        }
      ]
    }
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
    // The topic's system-assigned identity: the storage account takes no shared key. It holds
    // Storage Blob Data Contributor on the container (app/rbac.bicep).
    deadLetterWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: deadLetterStorageAccountId
          blobContainerName: deadLetterContainerName
        }
      }
    }
  }
}

output name string = vmWrites.name
