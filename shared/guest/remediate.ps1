# avma-remediator guest script: remediate v2
# Moves this Windows VM to KMS activation against the cloud's KMS host (install the KMS client
# setup key when asked, clear the KMS cache, set host and port, refresh, activate), then reads the
# facts again and prints them with each step's HRESULT as one marked JSON line
# (docs/guest-contract.md). Steps stop at the first failure. Given the Expect* parameters it is a
# conditional re-key: it reads the facts first and does anything only if every one is as given,
# else it changes nothing and prints the facts it read. Needs Windows PowerShell 3.0 or later
# (5.1 is the tested shape); on 2.0 it only prints the powershell-version error line.
param(
    [string]$ProductKey = '',
    [string]$KmsHost = '',
    [string]$KmsPort = '',
    [string]$InstallKey = '',
    [string]$ExpectChannel = '',
    [string]$ExpectEditionIds = '',
    [string]$ExpectSkus = '',
    [string]$ExpectBuild = '',
    [string]$ExpectProductTypes = '',
    [string]$RefuseKeyChannels = ''
)

# Windows PowerShell 2.0 (Server 2008 R2) parses this file but cannot run the rest of it: before
# anything else, print one marked line built from plain strings and stop, changing nothing.
if ($null -eq $PSVersionTable -or $PSVersionTable.PSVersion.Major -lt 3) {
    $guardVersion = '1.0'
    if ($null -ne $PSVersionTable) {
        $guardVersion = [string]$PSVersionTable.PSVersion.Major + '.' + [string]$PSVersionTable.PSVersion.Minor
    }
    Write-Output ('AVMA-REMEDIATOR-RESULT {"schema":2,"script":"remediate","os":null,"license":null,"kmsProbe":null,"attestation":null,"steps":[],"error":{"step":"powershell-version","hresult":"0x80070032","message":"Windows PowerShell ' + $guardVersion + ' is older than 3.0"}}')
    exit
}

$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
# Windows PowerShell 5.1 gives arrays an extra Count member that ConvertTo-Json would print.
try { Remove-TypeData -TypeName System.Array -ErrorAction Stop } catch { $null = $_ }

$ResultMarker = 'AVMA-REMEDIATOR-RESULT '
$ScriptName = 'remediate'
$WindowsAppId = '55c92734-d682-4d71-983e-d6ec3f16059f'
$HostPattern = '\A(?=.{1,253}\z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\z'
$PortPattern = '\A[0-9]{1,5}\z'
$KeyPattern = '\A[A-Z0-9]{5}(-[A-Z0-9]{5}){4}\z'
$ChannelWordPattern = '\A[A-Z_]{1,40}\z'
$EditionIdsPattern = '\A[A-Za-z]{1,40}(,[A-Za-z]{1,40}){0,7}\z'
$SkusPattern = '\A[0-9]{1,10}(,[0-9]{1,10}){0,7}\z'
$BuildPattern = '\A[0-9]{1,6}\z'
$ProductTypesPattern = '\A[1-3](,[1-3]){0,2}\z'
$KeyChannelsPattern = '\A[A-Za-z0-9:]{1,40}(,[A-Za-z0-9:]{1,40}){0,15}\z'
$PlainKeyChannelPattern = '\A[A-Za-z0-9:]{1,40}\z'

# @include common.ps1

# --- remediation ----------------------------------------------------------------------------

$steps = New-Object System.Collections.ArrayList
$stopped = $false

function Get-LicensingService {
    return (Get-WmiObject -Class SoftwareLicensingService)
}

function Get-ReturnValue {
    # SPP methods report failure by throwing; a non-zero ReturnValue is treated as failure too.
    param($Outcome)
    if ($null -eq $Outcome) { return [int64]0 }
    $property = $Outcome.PSObject.Properties['ReturnValue']
    if ($null -eq $property -or $null -eq $property.Value) { return [int64]0 }
    return [int64]$property.Value
}

function Invoke-Step {
    # Runs one step unless an earlier one failed, and records its HRESULT.
    param([string]$Name, [scriptblock]$Action)
    if ($script:stopped) { return }
    $code = [int64]0
    try {
        foreach ($returned in @(& $Action)) {
            if ($null -ne $returned -and [int64]$returned -ne 0) { $code = [int64]$returned; break }
        }
    }
    catch {
        $code = Get-HResult $_
        Write-Output ('Step ' + $Name + ' failed: ' + (Get-ErrorText $_))
    }
    $null = $script:steps.Add([ordered]@{ name = $Name; hresult = ConvertTo-HResultText $code })
    if ($code -ne 0) {
        $script:stopped = $true
        Write-Output ('Step ' + $Name + ': ' + (ConvertTo-HResultText $code) + '; later steps skipped')
    }
    else {
        Write-Output ('Step ' + $Name + ': done')
    }
}

function Get-UnmetPreconditions {
    # The facts that differ from the Expect* parameters, by name (docs/guest-contract.md,
    # "Conditional re-key"): exact, case-kept comparisons of the facts as they are printed.
    param($Facts)
    $failed = New-Object System.Collections.ArrayList
    if ($null -ne $Facts.error -or $null -eq $Facts.os -or $null -eq $Facts.license) {
        $null = $failed.Add('facts')
        return ,$failed
    }
    $os = $Facts.os
    $license = $Facts.license
    if (-not ([string]$license.description).Contains($ExpectChannel)) { $null = $failed.Add('channel') }
    if (-not (@($ExpectEditionIds.Split(',')) -ccontains [string]$os.editionId)) { $null = $failed.Add('editionId') }
    if (-not (@($ExpectSkus.Split(',')) -ccontains [string]$os.sku)) { $null = $failed.Add('sku') }
    if ([string]$os.build -cne $ExpectBuild) { $null = $failed.Add('build') }
    if (-not (@($ExpectProductTypes.Split(',')) -ccontains [string]$os.productType)) { $null = $failed.Add('productType') }
    $keyChannel = [string]$license.productKeyChannel
    if ($keyChannel -cne '') {
        $refused = $keyChannel -cnotmatch $PlainKeyChannelPattern
        foreach ($prefix in $RefuseKeyChannels.Split(',')) {
            if ($keyChannel.StartsWith($prefix, [System.StringComparison]::OrdinalIgnoreCase)) { $refused = $true }
        }
        if ($refused) { $null = $failed.Add('productKeyChannel') }
    }
    if ($null -eq $Facts.kmsProbe -or -not $Facts.kmsProbe.reachable) { $null = $failed.Add('kmsProbe') }
    # The comma keeps the list whole (PowerShell would unroll it: one name, or $null for none).
    return ,$failed
}

function Get-BeforeFacts {
    # What the comparison was made on, or $null when the facts could not be read.
    param($Facts)
    if ($null -ne $Facts.error -or $null -eq $Facts.os -or $null -eq $Facts.license) { return $null }
    return [ordered]@{
        editionId         = $Facts.os.editionId
        sku               = $Facts.os.sku
        build             = $Facts.os.build
        productType       = $Facts.os.productType
        productKeyChannel = $Facts.license.productKeyChannel
        licenseStatus     = $Facts.license.licenseStatus
        kmsReachable      = [bool]($null -ne $Facts.kmsProbe -and $Facts.kmsProbe.reachable)
    }
}

$result = [ordered]@{
    schema   = 2
    script   = $ScriptName
    os       = $null
    license  = $null
    kmsProbe = $null
    attestation = $null
    steps    = @()
    error    = $null
}

try {
    $problems = New-Object System.Collections.ArrayList
    if ($InstallKey -cne '0' -and $InstallKey -cne '1') { $null = $problems.Add('InstallKey is neither 0 nor 1') }
    if ($InstallKey -ceq '1' -and $ProductKey -cnotmatch $KeyPattern) {
        $null = $problems.Add('ProductKey is not a product key')
    }
    if ($InstallKey -ceq '0' -and $ProductKey -cne '') { $null = $problems.Add('ProductKey given but InstallKey is 0') }
    if ($KmsHost -cnotmatch $HostPattern) { $null = $problems.Add('KmsHost is not a host name') }
    if ($KmsPort -cnotmatch $PortPattern -or [int]$KmsPort -lt 1 -or [int]$KmsPort -gt 65535) {
        $null = $problems.Add('KmsPort is not a port number')
    }
    $conditional = ($ExpectChannel + $ExpectEditionIds + $ExpectSkus + $ExpectBuild + $ExpectProductTypes + $RefuseKeyChannels) -cne ''
    if ($conditional) {
        if ($InstallKey -cne '1') { $null = $problems.Add('a conditional re-key installs a key (InstallKey 1)') }
        if ($ExpectChannel -cnotmatch $ChannelWordPattern) { $null = $problems.Add('ExpectChannel is not a channel word') }
        if ($ExpectEditionIds -cnotmatch $EditionIdsPattern) { $null = $problems.Add('ExpectEditionIds is not a list of EditionIDs') }
        if ($ExpectSkus -cnotmatch $SkusPattern) { $null = $problems.Add('ExpectSkus is not a list of SKUs') }
        if ($ExpectBuild -cnotmatch $BuildPattern) { $null = $problems.Add('ExpectBuild is not a build number') }
        if ($ExpectProductTypes -cnotmatch $ProductTypesPattern) { $null = $problems.Add('ExpectProductTypes is not a list of product types') }
        if ($RefuseKeyChannels -cnotmatch $KeyChannelsPattern) { $null = $problems.Add('RefuseKeyChannels is not a list of key channels') }
    }
    $met = $true
    if ($problems.Count -gt 0) {
        Write-Output ('Invalid parameters, nothing changed: ' + ($problems -join '; '))
        $result.error = New-ScriptError 'parameters' 2147942487 ($problems -join '; ')
    }
    elseif ($conditional) {
        # Read the facts first; act only if every one is as given, else report them and stop.
        $check = [ordered]@{ os = $null; license = $null; kmsProbe = $null; attestation = $null; error = $null }
        Add-Facts $check $KmsHost ([int]$KmsPort)
        $failed = Get-UnmetPreconditions $check
        $met = $failed.Count -eq 0
        $result.preconditions = [ordered]@{ met = $met; failed = [object[]]$failed.ToArray(); before = (Get-BeforeFacts $check) }
        if (-not $met) {
            Write-Output ('Preconditions not met, nothing changed: ' + ($failed -join ', '))
            $result.os = $check.os
            $result.license = $check.license
            $result.kmsProbe = $check.kmsProbe
            $result.attestation = $check.attestation
            $result.error = $check.error
        }
    }
    if ($problems.Count -eq 0 -and $met) {
        $port = [uint32]$KmsPort
        if ($InstallKey -ceq '1') {
            Invoke-Step 'install-key' {
                Get-ReturnValue ((Get-LicensingService).InstallProductKey($ProductKey))
            }
        }
        Invoke-Step 'clear-kms-cache' {
            $service = Get-LicensingService
            $machine = Get-ReturnValue ($service.ClearKeyManagementServiceMachine())
            if ($machine -ne 0) { return $machine }
            Get-ReturnValue ($service.ClearKeyManagementServicePort())
        }
        Invoke-Step 'set-kms-host' {
            Get-ReturnValue ((Get-LicensingService).SetKeyManagementServiceMachine($KmsHost))
        }
        Invoke-Step 'set-kms-port' {
            Get-ReturnValue ((Get-LicensingService).SetKeyManagementServicePort($port))
        }
        Invoke-Step 'refresh' {
            Get-ReturnValue ((Get-LicensingService).RefreshLicenseStatus())
        }
        Invoke-Step 'activate' {
            $filter = "ApplicationID='" + $WindowsAppId + "' AND PartialProductKey IS NOT NULL"
            $products = @(Get-WmiObject -Class SoftwareLicensingProduct -Filter $filter | Where-Object { -not $_.LicenseIsAddon })
            # 0x80070490 (element not found): no single Windows product with a key to activate.
            if ($products.Count -ne 1) { return [int64]2147943568 }
            $activated = Get-ReturnValue ($products[0].Activate())
            if ($activated -ne 0) { return $activated }
            # slmgr.vbs /ato refreshes the license status after Activate() before reading it.
            Get-ReturnValue ((Get-LicensingService).RefreshLicenseStatus())
        }

        Add-Facts $result $KmsHost ([int]$KmsPort)
    }
}
catch {
    $result.error = New-ScriptError 'script' (Get-HResult $_) (Get-ErrorText $_)
}

Write-Result $result $steps
