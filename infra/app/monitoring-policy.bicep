// Associates every Windows VM of this subscription with the data collection rule, at scale, through
// the built-in policy "Configure Windows Virtual Machines to be associated with a Data Collection
// Rule or a Data Collection Endpoint" (policy definition 244efd75-0d92-453c-b9a3-7d73ca36ed52,
// version 3.x; source: Azure/azure-policy built-in-policies/policyDefinitions/Monitoring/
// AzureMonitor_DCRA_VM_Windows_DINE.json). DeployIfNotExists runs as the assignment's own
// identity, which needs the roles that definition lists in roleDefinitionIds (Monitoring
// Contributor, Log Analytics Contributor); subscription-roles.bicep grants exactly those.
//
// scopeToSupportedImages is false: AVMA VMs are typically migrated or built from custom images,
// which the definition's list of marketplace images would leave out. Azure Monitor Agent itself
// must be on the VMs (README, Deploy: the built-in definition ca817e41-e85a-4783-bc7f-dc532d36235e
// or initiative 9575b8b7-78ab-4281-b53b-d3c1ace2260b install it; this template does not, because
// their identity needs Virtual Machine Contributor).
targetScope = 'subscription'

param location string
param dataCollectionRuleId string
param environmentName string

var dcrAssociationPolicy = '244efd75-0d92-453c-b9a3-7d73ca36ed52'
var monitoringContributor = '749f88d5-cbae-40b8-bcfc-e573ddc772fa'
var logAnalyticsContributor = '92aaf0da-9dab-42b6-94a3-d43ce8d16293'

resource dcrAssociation 'Microsoft.Authorization/policyAssignments@2025-03-01' = {
  name: 'avma-dcra-${uniqueString(subscription().id, environmentName)}'
  location: location
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    displayName: 'avma-remediator (${environmentName}): associate Windows VMs with the SPP data collection rule'
    description: 'Sends the Microsoft-Windows-Security-SPP events of every Windows VM to the avma-remediator workspace.'
    policyDefinitionId: tenantResourceId('Microsoft.Authorization/policyDefinitions', dcrAssociationPolicy)
    definitionVersion: '3.*.*'
    enforcementMode: 'Default'
    parameters: {
      effect: {
        value: 'DeployIfNotExists'
      }
      scopeToSupportedImages: {
        value: false
      }
      dcrResourceId: {
        value: dataCollectionRuleId
      }
      resourceType: {
        value: 'Microsoft.Insights/dataCollectionRules'
      }
    }
  }
}

output principalId string = dcrAssociation.identity.principalId
output roleDefinitionIds array = [
  monitoringContributor
  logAnalyticsContributor
]
