// The Event Grid system topic of this subscription's resource events. Its event subscription,
// which delivers VM writes to the vm_write_event function, needs the deployed function and is made
// by post/wiring.bicep. The topic's own identity dead-letters undeliverable events into the app's
// storage account, whose shared keys are off (role in rbac.bicep, on the dead-letter container).
// One system topic per source is allowed: if this subscription already has one for
// Microsoft.Resources.Subscriptions, see the README (Deploy) for using it instead.
param systemTopicName string
param tags object

resource systemTopic 'Microsoft.EventGrid/systemTopics@2025-02-15' = {
  name: systemTopicName
  location: 'global'
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: subscription().id
    topicType: 'Microsoft.Resources.Subscriptions'
  }
}

output name string = systemTopic.name
output principalId string = systemTopic.identity.principalId
