# avma-remediator guest script: detect v2
# Reads the licensing facts of this Windows VM and prints them as one marked JSON line, as
# docs/guest-contract.md describes. It changes nothing. Needs Windows PowerShell 3.0 or later
# (5.1 is the tested shape); on 2.0 it only prints the powershell-version error line.
# Facts come from CIM/WMI and the registry only (never slmgr text, which is localized).
param(
    [string]$KmsHost = '',
    [string]$KmsPort = ''
)

# Windows PowerShell 2.0 (Server 2008 R2) parses this file but cannot run the rest of it: before
# anything else, print one marked line built from plain strings and stop, changing nothing.
if ($null -eq $PSVersionTable -or $PSVersionTable.PSVersion.Major -lt 3) {
    $guardVersion = '1.0'
    if ($null -ne $PSVersionTable) {
        $guardVersion = [string]$PSVersionTable.PSVersion.Major + '.' + [string]$PSVersionTable.PSVersion.Minor
    }
    Write-Output ('AVMA-REMEDIATOR-RESULT {"schema":2,"script":"detect","os":null,"license":null,"kmsProbe":null,"attestation":null,"steps":[],"error":{"step":"powershell-version","hresult":"0x80070032","message":"Windows PowerShell ' + $guardVersion + ' is older than 3.0"}}')
    exit
}

$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
# Windows PowerShell 5.1 gives arrays an extra Count member that ConvertTo-Json would print.
try { Remove-TypeData -TypeName System.Array -ErrorAction Stop } catch { $null = $_ }

$ResultMarker = 'AVMA-REMEDIATOR-RESULT '
$ScriptName = 'detect'
$WindowsAppId = '55c92734-d682-4d71-983e-d6ec3f16059f'
$HostPattern = '\A(?=.{1,253}\z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\z'
$PortPattern = '\A[0-9]{1,5}\z'

# @include common.ps1

# --- detection -------------------------------------------------------------------------------

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
