// The Event Grid system topic of this subscription's resource events: created here, or, when the
// subscription already has one (a subscription has at most one system topic for its resource
// events), that one, read and left as it is (main.bicep existingSystemTopicName). Its event
// subscription, which delivers VM writes to the vm_write_event function, needs the deployed function
// and is made by post/wiring.bicep. The topic's system-assigned identity dead-letters undeliverable
// events into the app's storage account, whose shared keys are off (role in rbac.bicep, on the
// dead-letter container): an existing topic must have one (scripts/preprovision.sh checks it).
@description('Name of the system topic: the one to create, or the existing one.')
param systemTopicName string

@description('true: create the topic in this resource group. false: use the existing topic systemTopicName in systemTopicResourceGroup.')
param createSystemTopic bool

@description('Resource group of the topic: this one when it is created here.')
param systemTopicResourceGroup string

param tags object

resource systemTopic 'Microsoft.EventGrid/systemTopics@2025-02-15' = if (createSystemTopic) {
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

resource existingSystemTopic 'Microsoft.EventGrid/systemTopics@2025-02-15' existing = {
  name: systemTopicName
  scope: resourceGroup(systemTopicResourceGroup)
}

output name string = systemTopicName
output resourceGroupName string = systemTopicResourceGroup
// Only the branch the condition picks is evaluated (ARM if()), so the existing topic is read only
// when it is used; without a system-assigned identity it has no principalId and this fails.
output principalId string = createSystemTopic ? systemTopic!.identity.principalId : existingSystemTopic.identity.principalId
