# azd preprovision hook (azure.yaml), the PowerShell twin of preprovision.sh: fails in one line,
# before anything is deployed, when the Azure CLI is not signed in (the postdeploy hook needs it),
# or when TARGET_SUBSCRIPTION_IDS holds something that is not a subscription id. Empty entries (a
# trailing comma, ' , ') are dropped, as infra/main.bicep drops them. Like preprovision.sh, it
# checks the Event Grid system topic of the subscription's resource events: one that already exists
# (not this environment's own, in rg-<env>) must be named with EXISTING_SYSTEM_TOPIC_NAME and
# EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP, and a named one must exist, be of that topic type, and have a
# system-assigned identity (it dead-letters into the app's storage, which takes no shared key).
$ErrorActionPreference = 'Stop'

if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    [Console]::Error.WriteLine('preprovision: the Azure CLI (az) is not installed or not on PATH; install it and run az login (the postdeploy hook needs it).')
    exit 1
}
az account show --output none 2>$null | Out-Null
if ($LASTEXITCODE -ne 0) {
    [Console]::Error.WriteLine('preprovision: the Azure CLI is not signed in; run az login (same tenant as azd) before azd up.')
    exit 1
}

$guid = '^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$'
$raw = [Environment]::GetEnvironmentVariable('TARGET_SUBSCRIPTION_IDS')
if ($null -eq $raw) { $raw = '' }
$targets = @()
foreach ($entry in $raw.Split(',')) {
    $id = $entry.Trim()
    if ($id -eq '') { continue }
    if ($id -notmatch $guid) {
        [Console]::Error.WriteLine("preprovision: TARGET_SUBSCRIPTION_IDS entry '$id' is not a subscription id; fix it with azd env set TARGET_SUBSCRIPTION_IDS <id>,<id>.")
        exit 1
    }
    $targets += $id
}
$topicType = 'microsoft.resources.subscriptions'
# The subscription checked: azd's (AZURE_SUBSCRIPTION_ID), which azd sets "right before an
# environment is provisioned for the first time" (azd's environment-variable docs), so a fresh
# environment's first hook may run before it is set: then az's default, said so in the output.
$subscriptionArgs = @()
$subscription = [Environment]::GetEnvironmentVariable('AZURE_SUBSCRIPTION_ID')
if (-not [string]::IsNullOrEmpty($subscription)) {
    $checked = "subscription $subscription (AZURE_SUBSCRIPTION_ID)"
}
else {
    $subscription = "$(az account show --query id --output tsv 2>$null)".Trim()
    $shownDefault = if ($subscription -eq '') { 'unknown' } else { $subscription }
    $checked = "subscription $shownDefault (az's default: AZURE_SUBSCRIPTION_ID is not set yet; if azd deploys to another one, azd env set AZURE_SUBSCRIPTION_ID <id> and run again)"
}
if (-not [string]::IsNullOrEmpty($subscription)) { $subscriptionArgs = @('--subscription', $subscription) }
$topicName = [Environment]::GetEnvironmentVariable('EXISTING_SYSTEM_TOPIC_NAME')
$topicGroup = [Environment]::GetEnvironmentVariable('EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP')
if (-not [string]::IsNullOrEmpty($topicName) -or -not [string]::IsNullOrEmpty($topicGroup)) {
    if ([string]::IsNullOrEmpty($topicName) -or [string]::IsNullOrEmpty($topicGroup)) {
        [Console]::Error.WriteLine('preprovision: set both EXISTING_SYSTEM_TOPIC_NAME and EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP (azd env set), or neither.')
        exit 1
    }
    $foundType = az eventgrid system-topic show @subscriptionArgs --name $topicName --resource-group $topicGroup `
        --query topicType --output tsv 2>$null
    if ($LASTEXITCODE -ne 0) {
        [Console]::Error.WriteLine("preprovision: no Event Grid system topic '$topicName' in resource group '$topicGroup'; list them with az eventgrid system-topic list --query `"[?topicType=='Microsoft.Resources.Subscriptions']`".")
        exit 1
    }
    if ("$foundType".Trim().ToLowerInvariant() -ne $topicType) {
        [Console]::Error.WriteLine("preprovision: the system topic '$topicName' is of type '$foundType', not Microsoft.Resources.Subscriptions (the subscription's resource events); set EXISTING_SYSTEM_TOPIC_NAME to that one.")
        exit 1
    }
    $identity = az eventgrid system-topic show @subscriptionArgs --name $topicName --resource-group $topicGroup `
        --query identity.type --output tsv 2>$null
    if (-not "$identity".ToLowerInvariant().Contains('systemassigned')) {
        [Console]::Error.WriteLine("preprovision: the system topic '$topicName' has no system-assigned identity, which dead-letters into the app's storage; add one (az eventgrid system-topic update --name $topicName --resource-group $topicGroup --mi-system-assigned, or beside its user-assigned ones: see the README, Deploy).")
        exit 1
    }
    Write-Host "preprovision: the existing Event Grid system topic $topicName ($topicGroup) gets the event subscription."
}
else {
    # name, resource group and topic type of each system topic; this environment's own is in rg-<env>.
    $own = "rg-$([Environment]::GetEnvironmentVariable('AZURE_ENV_NAME'))".ToLowerInvariant()
    # A subscription whose Microsoft.EventGrid provider is not registered has no topic (the list fails
    # with MissingSubscriptionRegistration); any other failure (no right to read, a network error)
    # would leave the check unmade, so it stops here, in one line. az's stderr is kept apart from its
    # rows ('Continue': Windows PowerShell turns redirected native stderr into errors under 'Stop').
    $ErrorActionPreference = 'Continue'
    $output = @(az eventgrid system-topic list @subscriptionArgs --query '[].[name, resourceGroup, topicType]' --output tsv 2>&1)
    $listExit = $LASTEXITCODE
    $ErrorActionPreference = 'Stop'
    $rows = @($output | Where-Object { $_ -isnot [System.Management.Automation.ErrorRecord] })
    $said = @($output | Where-Object { $_ -is [System.Management.Automation.ErrorRecord] } | ForEach-Object { "$_".Trim() } | Where-Object { $_ -ne '' })
    if ($listExit -ne 0) {
        if (($said -join ' ') -match 'MissingSubscriptionRegistration|not registered') {
            $rows = @()
        }
        else {
            $first = if ($said.Count -gt 0) { $said[0] } else { 'az failed with no message' }
            if ($first.Length -gt 300) { $first = $first.Substring(0, 300) }
            [Console]::Error.WriteLine("preprovision: cannot list the Event Grid system topics of ${checked}: $first")
            exit 1
        }
    }
    foreach ($row in @($rows)) {
        $fields = "$row".Split("`t")
        if ($fields.Count -lt 3) { continue }
        if ($fields[2].Trim().ToLowerInvariant() -eq $topicType -and $fields[1].ToLowerInvariant() -ne $own) {
            $name = $fields[0]
            $group = $fields[1]
            [Console]::Error.WriteLine("preprovision: this subscription already has the Event Grid system topic $name (resource group $group) for its resource events, and can have only one; use it: azd env set EXISTING_SYSTEM_TOPIC_NAME $name && azd env set EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP $group")
            exit 1
        }
    }
}

$shown = if ($targets.Count -gt 0) { $targets -join ',' } else { 'none' }
Write-Host "preprovision: az is signed in; checked $checked; extra target subscriptions: $shown."
