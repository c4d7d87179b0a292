# azd postdeploy hook (azure.yaml), the PowerShell twin of postdeploy.sh: wires up what needs the
# deployed function code.
#
#   1. waits until the Functions host lists vm_write_event and alert_webhook;
#   2. deploys infra/post/wiring.bicep: the Event Grid subscription, the action group and the log
#      search alert for 0xC004FD02;
#   3. when AZURE_MANAGEMENT_GROUP_ID is set, deploys infra/management-group.bicep (the custom VM
#      role at that management group).
#
# Idempotent: every deployment and resource name is fixed, so running it again changes nothing.
# Needs the Azure CLI signed in to the same tenant (az login): checked first, in one line. By hand, load the azd values first:
#   azd env get-values | ForEach-Object { $k, $v = $_ -split '=', 2; Set-Item "env:$k" $v.Trim('"') }
$ErrorActionPreference = 'Stop'

# First, before anything else: every step below is an `az` call.
if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    [Console]::Error.WriteLine('postdeploy: the Azure CLI (az) is not installed or not on PATH; install it, run az login, then azd deploy again.')
    exit 1
}
az account show --output none 2>$null | Out-Null
if ($LASTEXITCODE -ne 0) {
    [Console]::Error.WriteLine('postdeploy: the Azure CLI is not signed in; run az login (same tenant as azd), then azd deploy again.')
    exit 1
}

function Get-Required([string] $Name) {
    $value = [Environment]::GetEnvironmentVariable($Name)
    if ([string]::IsNullOrEmpty($value)) {
        throw "$Name is not set: run through azd (azd up / azd deploy), or load the azd values first"
    }
    return $value
}

$subscription = Get-Required 'AZURE_SUBSCRIPTION_ID'
$resourceGroup = Get-Required 'AZURE_RESOURCE_GROUP'
$functionApp = Get-Required 'AZURE_FUNCTION_APP_NAME'
$systemTopic = Get-Required 'AZURE_SYSTEM_TOPIC_NAME'
$workspace = Get-Required 'AZURE_LOG_ANALYTICS_WORKSPACE_NAME'
$storageAccount = Get-Required 'AZURE_STORAGE_ACCOUNT_NAME'
$deadLetterContainer = Get-Required 'AZURE_DEAD_LETTER_CONTAINER'
$location = Get-Required 'AZURE_LOCATION'
# The topic's resource group: another one when the subscription already had a topic; an
# environment provisioned before that output existed has its topic in its own resource group.
$topicGroup = [Environment]::GetEnvironmentVariable('AZURE_SYSTEM_TOPIC_RESOURCE_GROUP')
if ([string]::IsNullOrEmpty($topicGroup)) { $topicGroup = $resourceGroup }
$infra = Join-Path (Join-Path $PSScriptRoot '..') 'infra'

Write-Host "Waiting for the functions of $functionApp to be indexed..."
$attempt = 0
while ($true) {
    $names = az functionapp function list --subscription $subscription --resource-group $resourceGroup `
        --name $functionApp --query '[].name' --output tsv 2>$null
    $text = ($names | Out-String)
    if ($text.Contains('vm_write_event') -and $text.Contains('alert_webhook')) {
        break
    }
    $attempt += 1
    if ($attempt -ge 30) {
        throw 'The functions vm_write_event and alert_webhook did not appear within 5 minutes; run azd deploy again.'
    }
    Start-Sleep -Seconds 10
}

Write-Host 'Deploying the Event Grid subscription, the action group and the log search alert...'
az deployment group create `
    --subscription $subscription `
    --resource-group $resourceGroup `
    --name avma-remediator-wiring `
    --template-file (Join-Path $infra 'post/wiring.bicep') `
    --parameters `
        "functionAppName=$functionApp" `
        "systemTopicName=$systemTopic" `
        "systemTopicResourceGroup=$topicGroup" `
        "workspaceName=$workspace" `
        "location=$location" `
        "storageAccountName=$storageAccount" `
        "deadLetterContainerName=$deadLetterContainer" `
    --output none
if ($LASTEXITCODE -ne 0) {
    throw "az deployment group create failed with exit code $LASTEXITCODE"
}

$managementGroup = [Environment]::GetEnvironmentVariable('AZURE_MANAGEMENT_GROUP_ID')
if (-not [string]::IsNullOrEmpty($managementGroup)) {
    $principalId = Get-Required 'AZURE_IDENTITY_PRINCIPAL_ID'
    $environmentName = Get-Required 'AZURE_ENV_NAME'
    Write-Host "Granting the VM role at management group $managementGroup..."
    az deployment mg create `
        --management-group-id $managementGroup `
        --location $location `
        --name "avma-remediator-vm-access-$environmentName" `
        --template-file (Join-Path $infra 'management-group.bicep') `
        --parameters `
            "principalId=$principalId" `
            "environmentName=$environmentName" `
        --output none
    if ($LASTEXITCODE -ne 0) {
        throw "az deployment mg create failed with exit code $LASTEXITCODE"
    }
}

$mode = [Environment]::GetEnvironmentVariable('REMEDIATION_MODE')
if ([string]::IsNullOrEmpty($mode)) { $mode = 'audit' }
Write-Host "avma-remediator is wired up (mode: $mode)."
