// The custom VM role at a management group, for MANAGEMENT_GROUP_ID (the sweep then covers every
// subscription under the group through Resource Graph). A subscription-scope deployment cannot
// target a management group (an ARM limitation), so this is a deployment of its own:
//
//   az deployment mg create --management-group-id <group> --location <region> \
//     --template-file infra/management-group.bicep \
//     --parameters principalId=<AZURE_IDENTITY_PRINCIPAL_ID> environmentName=<env>
//
// The azd postdeploy hook runs exactly that when AZURE_MANAGEMENT_GROUP_ID is set. The actions are
// the same as app/vm-access.bicep's; tests/test_infra_permissions.py checks both.
targetScope = 'managementGroup'

@description('Object id of the Function App identity (azd output AZURE_IDENTITY_PRINCIPAL_ID).')
param principalId string

@description('azd environment name; keeps role names unique when several environments share a tenant.')
param environmentName string

resource vmOperator 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(managementGroup().id, 'avma-remediator-vm-operator', environmentName)
  properties: {
    roleName: 'AVMA Remediator VM Operator (${environmentName}, ${managementGroup().name})'
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
      managementGroup().id
    ]
  }
}

resource vmOperatorAssignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(managementGroup().id, principalId, vmOperator.id)
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: vmOperator.id
    description: 'avma-remediator (${environmentName}): VM read and Run Command'
  }
}
