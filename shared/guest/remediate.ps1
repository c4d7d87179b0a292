# avma-remediator guest script: remediate v1
# Moves this Windows VM to KMS activation against the cloud's KMS host (install the KMS client
# setup key when asked, clear the KMS cache, set host and port, refresh, activate), then reads the
# facts again and prints them with each step's HRESULT as one marked JSON line
# (docs/guest-contract.md). Windows PowerShell 4.0 and 5.1. Steps stop at the first failure.
param(
    [string]$ProductKey = '',
    [string]$KmsHost = '',
    [string]$KmsPort = '',
    [string]$InstallKey = ''
)

$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
# Windows PowerShell 5.1 gives arrays an extra Count member that ConvertTo-Json would print.
try { Remove-TypeData -TypeName System.Array -ErrorAction Stop } catch { $null = $_ }

$ResultMarker = 'AVMA-REMEDIATOR-RESULT '
$WindowsAppId = '55c92734-d682-4d71-983e-d6ec3f16059f'
$HostPattern = '\A(?=.{1,253}\z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\z'
$PortPattern = '\A[0-9]{1,5}\z'
$KeyPattern = '\A[A-Z0-9]{5}(-[A-Z0-9]{5}){4}\z'

# --- helpers (the same text in detect.ps1 and remediate.ps1) ------------------------------------

function ConvertTo-HResultText {
    # HResult is a signed Int32; print it as 0x + 8 upper-case hex digits of the unsigned value.
    param($Code)
    $value = [int64]$Code
    if ($value -lt 0) { $value = $value + 4294967296 }
    $value = $value % 4294967296
    return ('0x{0:X8}' -f $value)
}

function Get-HResult {
    # The innermost exception carries the code Windows returned (COMException for SPP/WMI).
    param($ErrorRecord)
    $code = $null
    $exception = $ErrorRecord.Exception
    while ($null -ne $exception) {
        $candidate = $null
        $typeName = $exception.GetType().FullName
        if ($typeName -eq 'Microsoft.Management.Infrastructure.CimException') {
            $data = $exception.ErrorData
            if ($null -ne $data) {
                $property = $data.CimInstanceProperties['error_Code']
                if ($null -ne $property -and $null -ne $property.Value) { $candidate = [int64]$property.Value }
            }
        }
        elseif ($typeName -eq 'System.Management.ManagementException') {
            $candidate = [int64]$exception.ErrorCode
        }
        elseif ($exception -is [System.Runtime.InteropServices.ExternalException]) {
            $candidate = [int64]$exception.ErrorCode
        }
        if ($null -eq $candidate -and $null -ne $exception.HResult) {
            $candidate = [int64]$exception.HResult
        }
        if ($null -ne $candidate -and $candidate -ne 0) { $code = $candidate }
        $exception = $exception.InnerException
    }
    if ($null -eq $code) { $code = 2147500037 }
    return $code
}

function Get-ShortText {
    # Cut text so that, once non-ASCII characters are escaped as \uXXXX, it stays within $Max.
    param($Value, [int]$Max = 120)
    if ($null -eq $Value) { return $null }
    $text = [string]$Value
    $length = 0
    for ($i = 0; $i -lt $text.Length; $i++) {
        $cost = 1
        if ([int]$text[$i] -gt 126 -or [int]$text[$i] -lt 32) { $cost = 6 }
        if ($length + $cost -gt $Max) { return $text.Substring(0, $i) }
        $length = $length + $cost
    }
    return $text
}

function Get-ErrorText {
    param($ErrorRecord)
    $exception = $ErrorRecord.Exception
    while ($null -ne $exception.InnerException) { $exception = $exception.InnerException }
    $text = ($exception.GetType().Name + ': ' + $exception.Message) -replace '\s+', ' '
    return (Get-ShortText $text 160)
}

function Get-OptionalString {
    param($Value, [int]$Max = 120)
    if ($null -eq $Value) { return $null }
    return (Get-ShortText ([string]$Value) $Max)
}

function Get-OptionalInt {
    param($Value)
    if ($null -eq $Value) { return 0 }
    return [int64]$Value
}

function Read-OsFacts {
    $os = Get-CimInstance -ClassName Win32_OperatingSystem
    $key = Get-ItemProperty -Path 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion' -Name EditionID
    return [ordered]@{
        caption     = Get-ShortText ([string]$os.Caption) 120
        version     = Get-ShortText ([string]$os.Version) 40
        build       = [int64]$os.BuildNumber
        productType = [int64]$os.ProductType
        sku         = [int64]$os.OperatingSystemSKU
        editionId   = Get-ShortText ([string]$key.EditionID) 60
    }
}

function Read-LicenseFacts {
    # The Windows product that carries a key; add-ons (for example ESU) share the Windows
    # ApplicationID, so they are left out as slmgr.vbs does (LicenseIsAddon).
    $filter = "ApplicationID='" + $WindowsAppId + "' AND PartialProductKey IS NOT NULL"
    $found = @(Get-CimInstance -ClassName SoftwareLicensingProduct -Filter $filter)
    $products = @($found | Where-Object { -not $_.LicenseIsAddon })
    if ($products.Count -eq 0) { return $null }
    if ($products.Count -gt 1) {
        throw (New-Object System.InvalidOperationException ([string]$products.Count + ' Windows products carry a product key'))
    }
    $product = $products[0]
    $channel = $null
    $channelProperty = $product.CimInstanceProperties['ProductKeyChannel']
    if ($null -ne $channelProperty) { $channel = $channelProperty.Value }
    return [ordered]@{
        name                 = Get-OptionalString $product.Name 120
        description          = Get-OptionalString $product.Description 120
        productKeyChannel    = Get-OptionalString $channel 40
        partialProductKey    = Get-OptionalString $product.PartialProductKey 10
        licenseStatus        = [int64]$product.LicenseStatus
        graceMinutes         = Get-OptionalInt $product.GracePeriodRemaining
        kmsMachine           = Get-OptionalString $product.KeyManagementServiceMachine 255
        kmsPort              = Get-OptionalInt $product.KeyManagementServicePort
        discoveredKmsMachine = Get-OptionalString $product.DiscoveredKeyManagementServiceMachineName 255
        discoveredKmsPort    = Get-OptionalInt $product.DiscoveredKeyManagementServiceMachinePort
    }
}

function Test-KmsConnection {
    # TCP connect with a 3 s wait; the socket is always closed.
    param([string]$TargetHost, [int]$TargetPort)
    $reachable = $false
    $problem = $null
    $client = $null
    try {
        $client = New-Object System.Net.Sockets.TcpClient
        $pending = $client.BeginConnect($TargetHost, $TargetPort, $null, $null)
        if ($pending.AsyncWaitHandle.WaitOne(3000, $false)) {
            $client.EndConnect($pending)
            $reachable = $true
        }
        else {
            $problem = 'no answer within 3 s'
        }
    }
    catch {
        $inner = $_.Exception
        while ($null -ne $inner.InnerException) { $inner = $inner.InnerException }
        if ($inner -is [System.Net.Sockets.SocketException]) {
            $problem = 'socket error ' + [string]$inner.SocketErrorCode
        }
        else {
            $problem = Get-ErrorText $_
        }
    }
    finally {
        if ($null -ne $client) { $client.Close() }
    }
    return [ordered]@{
        host      = $TargetHost
        port      = $TargetPort
        reachable = $reachable
        error     = $problem
    }
}

function New-ScriptError {
    param([string]$Step, $Code, [string]$Message)
    return [ordered]@{
        step    = $Step
        hresult = ConvertTo-HResultText $Code
        message = Get-ShortText $Message 160
    }
}

function Write-Result {
    # The marked line is written last, as compact JSON with every non-ASCII character escaped.
    param($Result)
    $json = ConvertTo-Json -InputObject $Result -Compress -Depth 5
    $builder = New-Object System.Text.StringBuilder
    foreach ($character in $json.ToCharArray()) {
        if ([int]$character -gt 126) { $null = $builder.AppendFormat('\u{0:x4}', [int]$character) }
        else { $null = $builder.Append($character) }
    }
    Write-Output ($ResultMarker + $builder.ToString())
}

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

$result = [ordered]@{
    schema   = 1
    script   = 'remediate'
    os       = $null
    license  = $null
    kmsProbe = $null
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
    if ($problems.Count -gt 0) {
        Write-Output ('Invalid parameters, nothing changed: ' + ($problems -join '; '))
        $result.error = New-ScriptError 'parameters' 2147942487 ($problems -join '; ')
    }
    else {
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
            Get-ReturnValue ($products[0].Activate())
        }

        $step = 'read-os'
        try {
            $result.os = Read-OsFacts
            $step = 'read-license'
            $result.license = Read-LicenseFacts
        }
        catch {
            Write-Output ('Could not ' + $step + ': ' + (Get-ErrorText $_))
            $result.error = New-ScriptError $step (Get-HResult $_) (Get-ErrorText $_)
        }
        $result.kmsProbe = Test-KmsConnection $KmsHost ([int]$KmsPort)
    }
}
catch {
    $result.error = New-ScriptError 'script' (Get-HResult $_) (Get-ErrorText $_)
}

$result.steps = [object[]]$steps.ToArray()
Write-Result $result
