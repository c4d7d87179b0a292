# --- helpers shared by detect.ps1 and remediate.ps1 (scripts.py inserts this file at their include line) ---

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

function Get-JsonCost {
    # Bytes one character takes in the result line. Windows PowerShell 5.1's ConvertTo-Json
    # (JavaScriptSerializer, HttpUtility.JavaScriptStringEncode) writes " and \ as two bytes and
    # ' < > & and control characters as \u00XX; Write-Result writes every character above 126 as
    # \uXXXX. Control characters are charged 6 even where the encoder writes \n (2).
    param([int]$Code)
    if ($Code -lt 32 -or $Code -gt 126) { return 6 }
    if ($Code -eq 39 -or $Code -eq 60 -or $Code -eq 62 -or $Code -eq 38) { return 6 }
    if ($Code -eq 34 -or $Code -eq 92) { return 2 }
    return 1
}

function Get-ShortText {
    # Cut text so that, once written into the result line (escapes included), it takes at most $Max bytes.
    param($Value, [int]$Max = 120)
    if ($null -eq $Value) { return $null }
    $text = [string]$Value
    $length = 0
    for ($i = 0; $i -lt $text.Length; $i++) {
        $cost = Get-JsonCost ([int]$text[$i])
        if ($length + $cost -gt $Max) {
            # Never end on the first half of a surrogate pair (55296..56319): it is not text.
            $before = 0
            if ($i -gt 0) { $before = [int]$text[$i - 1] }
            if ($before -gt 55295 -and $before -lt 56320) { return $text.Substring(0, $i - 1) }
            return $text.Substring(0, $i)
        }
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
        # [string]$null is '': a product without a Name or Description still gives a readable line.
        name                 = Get-ShortText ([string]$product.Name) 120
        description          = Get-ShortText ([string]$product.Description) 120
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

function Get-HttpStatus {
    # The status of an HTTP error answer, or $null: WebRequest.GetResponse throws a WebException
    # with Status ProtocolError whose Response is the server's error response (an HttpWebResponse).
    param($ErrorRecord)
    $exception = $ErrorRecord.Exception
    while ($null -ne $exception) {
        if ($exception -is [System.Net.WebException] -and $exception.Response -is [System.Net.HttpWebResponse]) {
            return [int]$exception.Response.StatusCode
        }
        $exception = $exception.InnerException
    }
    return $null
}

function Test-Attestation {
    # Azure Edition only: fetch IMDS's attested document (no proxy, 5 s) and build its signing
    # certificate's chain from the machine's stores, as Microsoft's IMDSCertCheck.ps1 does.
    $reachable = $false
    $chainValid = $null
    $problem = $null
    $response = $null
    $reader = $null
    try {
        $uri = 'http://169.254.169.254/metadata/attested/document?api-version=2020-09-01'
        $request = [System.Net.WebRequest]::Create($uri)
        $request.Method = 'GET'
        $request.Headers.Add('Metadata', 'true')
        $request.Proxy = $null
        $request.Timeout = 5000
        $request.ReadWriteTimeout = 5000
        $response = $request.GetResponse()
        $reader = New-Object System.IO.StreamReader ($response.GetResponseStream())
        $body = $reader.ReadToEnd()
        $reachable = $true
        $chainValid = $false
        $document = ConvertFrom-Json -InputObject $body
        $signature = [System.Convert]::FromBase64String([string]$document.signature)
        # A PKCS#7 blob loads as the certificate that signed it (GetSignerInPKCS7Store; docs/guest-contract.md).
        $certificate = [System.Security.Cryptography.X509Certificates.X509Certificate2]$signature
        $chain = New-Object System.Security.Cryptography.X509Certificates.X509Chain
        if ($chain.Build($certificate)) {
            $chainValid = $true
        }
        else {
            $status = @($chain.ChainStatus)
            $problem = 'certificate chain not built'
            if ($status.Count -gt 0) { $problem = $problem + ': ' + [string]$status[0].Status }
        }
    }
    catch {
        $problem = Get-ErrorText $_
        # IMDS answered, with an HTTP error status (429, 5xx, 404, ...): say so, so that the
        # engine does not blame proxies or routes (docs/guest-contract.md).
        $status = Get-HttpStatus $_
        if ($null -ne $status) { $problem = 'HTTP ' + [string]$status + ': ' + $problem }
    }
    finally {
        if ($null -ne $reader) { $reader.Close() }
        if ($null -ne $response) { $response.Close() }
    }
    return [ordered]@{
        imdsReachable = $reachable
        chainValid    = $chainValid
        error         = Get-ShortText $problem 160
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
    # The marked line is written last, as compact JSON with every non-ASCII character escaped. If
    # building or writing it fails, a fixed line built from plain strings is written instead.
    param($Result, $Steps)
    try {
        if ($null -ne $Steps) { $Result.steps = [object[]]$Steps.ToArray() }
        $json = ConvertTo-Json -InputObject $Result -Compress -Depth 5
        $builder = New-Object System.Text.StringBuilder
        foreach ($character in $json.ToCharArray()) {
            if ([int]$character -gt 126) { $null = $builder.AppendFormat('\u{0:x4}', [int]$character) }
            else { $null = $builder.Append($character) }
        }
        Write-Output ($ResultMarker + $builder.ToString())
    }
    catch {
        Write-Output ($ResultMarker + '{"schema":2,"script":"' + $ScriptName + '","os":null,"license":null,"kmsProbe":null,"attestation":null,"steps":[],"error":{"step":"write-result","hresult":"0x80004005","message":"the result line could not be built or written"}}')
    }
}

# Reads the OS and licensing facts, probes the KMS and, on Azure Edition (EditionID ServerTurbine*, any case),
# checks the IMDS attestation into $Result (both scripts end with this); a fact that cannot be read
# becomes $Result.error naming the step.
function Add-Facts($Result, [string]$HostName, [int]$Port) {
    $step = 'read-os'
    try {
        $Result.os = Read-OsFacts
        $step = 'read-license'
        $Result.license = Read-LicenseFacts
    }
    catch {
        Write-Output ('Could not ' + $step + ': ' + (Get-ErrorText $_))
        $Result.error = New-ScriptError $step (Get-HResult $_) (Get-ErrorText $_)
    }
    $Result.kmsProbe = Test-KmsConnection $HostName $Port
    # ASCII case-insensitive, as the engine (shared.decide.is_azure_edition); -like would follow the
    # current culture (tr-TR: 'I' and 'i' differ).
    if ($null -ne $Result.os -and ([string]$Result.os.editionId).StartsWith('ServerTurbine', [System.StringComparison]::OrdinalIgnoreCase)) {
        $Result.attestation = Test-Attestation
    }
}
