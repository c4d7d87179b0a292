// What the remediator may do to VMs, at one target subscription: a custom role holding exactly the
// ARM actions the engine performs, assigned to the app's identity at this subscription.
//
//   GET  .../virtualMachines/{vm}?$expand=instanceView   Microsoft.Compute/virtualMachines/read
//   GET  .../providers/Microsoft.Compute/virtualMachines  (list, also ?statusOnly=true; CLI sweep)
//                                                         Microsoft.Compute/virtualMachines/read
//   POST .../virtualMachines/{vm}/runCommand              Microsoft.Compute/virtualMachines/runCommand/action
//   GET  .../providers/Microsoft.Compute/locations/{l}/operations/{id}   (polling the Run Command)
//                                                         Microsoft.Compute/locations/operations/read
//
// Resource Graph needs no action of its own: it returns the resources the caller can read
// (learn.microsoft.com/azure/governance/resource-graph/overview, "Permissions in Azure Resource
// Graph"). tests/test_infra_permissions.py derives these actions from the requests that reach the
// simulator when the engine runs and fails if the role grants more or less.
targetScope = 'subscription'

@description('Object id of the Function App identity.')
param principalId string

@description('azd environment name; keeps role names unique when several environments share a tenant.')
param environmentName string

resource vmOperator 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, 'avma-remediator-vm-operator', environmentName)
  properties: {
    roleName: 'AVMA Remediator VM Operator (${environmentName}, ${subscription().subscriptionId})'
    description: 'Read VMs, run the activation scripts through Run Command and poll the command. Nothing else.'
    type: 'CustomRole'
    permissions: [
      {
        actions: [
          'Microsoft.Compute/virtualMachines/read'
          'Microsoft.Compute/virtualMachines/runCommand/action'
          'Microsoft.Compute/locations/operations/read'
        ]
        notActions: []
        dataActions: []
        notDataActions: []
      }
    ]
    assignableScopes: [
      subscription().id
    ]
  }
}

resource vmOperatorAssignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(subscription().id, principalId, vmOperator.id)
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: vmOperator.id
    description: 'avma-remediator (${environmentName}): VM read and Run Command'
  }
}

output roleDefinitionId string = vmOperator.id
