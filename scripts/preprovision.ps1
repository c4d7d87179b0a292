# azd preprovision hook (azure.yaml), the PowerShell twin of preprovision.sh: fails in one line,
# before anything is deployed, when the Azure CLI is not signed in (the postdeploy hook needs it),
# or when TARGET_SUBSCRIPTION_IDS holds something that is not a subscription id. Empty entries (a
# trailing comma, ' , ') are dropped, as infra/main.bicep drops them.
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
$shown = if ($targets.Count -gt 0) { $targets -join ',' } else { 'none' }
Write-Host "preprovision: az is signed in; extra target subscriptions: $shown."
