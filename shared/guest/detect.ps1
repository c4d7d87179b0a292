# avma-remediator guest script: detect v2
# Reads the licensing facts of this Windows VM and prints them as one marked JSON line, as
# docs/guest-contract.md describes. It changes nothing. Windows PowerShell 4.0 and 5.1.
# Facts come from CIM/WMI and the registry only (never slmgr text, which is localized).
param(
    [string]$KmsHost = '',
    [string]$KmsPort = ''
)

$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
# Windows PowerShell 5.1 gives arrays an extra Count member that ConvertTo-Json would print.
try { Remove-TypeData -TypeName System.Array -ErrorAction Stop } catch { $null = $_ }

$ResultMarker = 'AVMA-REMEDIATOR-RESULT '
$WindowsAppId = '55c92734-d682-4d71-983e-d6ec3f16059f'
$HostPattern = '\A(?=.{1,253}\z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\z'
$PortPattern = '\A[0-9]{1,5}\z'

# @include common.ps1

# --- detection -------------------------------------------------------------------------------

$result = [ordered]@{
    schema   = 2
    script   = 'detect'
    os       = $null
    license  = $null
    kmsProbe = $null
    attestation = $null
    steps    = @()
    error    = $null
}

try {
    $problems = New-Object System.Collections.ArrayList
    if ($KmsHost -cnotmatch $HostPattern) { $null = $problems.Add('KmsHost is not a host name') }
    if ($KmsPort -cnotmatch $PortPattern -or [int]$KmsPort -lt 1 -or [int]$KmsPort -gt 65535) {
        $null = $problems.Add('KmsPort is not a port number')
    }
    if ($problems.Count -gt 0) {
        Write-Output ('Invalid parameters: ' + ($problems -join '; '))
        $result.error = New-ScriptError 'parameters' 2147942487 ($problems -join '; ')
    }
    else {
        Add-Facts $result $KmsHost ([int]$KmsPort)
    }
}
catch {
    $result.error = New-ScriptError 'script' (Get-HResult $_) (Get-ErrorText $_)
}

Write-Result $result
