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
// The KMS path check (shared/azure/network.py; issue 11), only for a VM whose KMS failed; reads only,
// the identity gets no right to change a network:
//   GET  .../networkInterfaces/{nic}                      Microsoft.Network/networkInterfaces/read
//   POST .../networkInterfaces/{nic}/effectiveRouteTable  Microsoft.Network/networkInterfaces/effectiveRouteTable/action
//   GET  .../providers/Microsoft.Network/locations/{l}/operationResults/{id}   (its long-running result)
//                                                         Microsoft.Network/locations/operationResults/read
//   GET  .../virtualNetworks/{vnet}/subnets/{subnet}      Microsoft.Network/virtualNetworks/subnets/read
//   GET  .../routeTables/{rt}                             Microsoft.Network/routeTables/read
//   GET  .../loadBalancers/{lb}                           Microsoft.Network/loadBalancers/read
//   GET  .../networkSecurityGroups/{nsg}                  Microsoft.Network/networkSecurityGroups/read
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
    description: 'Read VMs, run the activation scripts through Run Command and poll the command; read the network path to the KMS (no network write). Nothing else.'
    type: 'CustomRole'
    permissions: [
      {
        actions: [
          'Microsoft.Compute/virtualMachines/read'
          'Microsoft.Compute/virtualMachines/runCommand/action'
          'Microsoft.Compute/locations/operations/read'
          'Microsoft.Network/networkInterfaces/read'
          'Microsoft.Network/networkInterfaces/effectiveRouteTable/action'
          'Microsoft.Network/locations/operationResults/read'
          'Microsoft.Network/virtualNetworks/subnets/read'
          'Microsoft.Network/routeTables/read'
          'Microsoft.Network/loadBalancers/read'
          'Microsoft.Network/networkSecurityGroups/read'
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
