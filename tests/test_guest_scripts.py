"""The guest scripts: valid Windows PowerShell 4.0/5.1 syntax, the contract's parameters and marker,
and Run Command bodies in which caller text can only ever be a parameter value."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import pytest
import tree_sitter_powershell as tsp
from hypothesis import given
from hypothesis import strategies as st
from tree_sitter import Language, Node, Parser

from shared.catalog import CATALOG
from shared.guest import scripts
from shared.guest.facts import RESULT_MARKER, STEP_NAMES, WINDOWS_APPLICATION_ID, parse_result
from shared.guest.scripts import DETECT, REMEDIATE, RunCommandInput, detect_command, remediate_command

PARSER = Parser(Language(tsp.language()))
CONTRACT = Path(__file__).resolve().parents[1] / "docs" / "guest-contract.md"
SCRIPTS = {"detect": DETECT, "remediate": REMEDIATE}
GOOD_KEY = "WX4NM-KYWYW-QJJR4-XV3QB-6VM33"
HOST = "azkms.core.windows.net"

# Nodes whose text is data, not code: PS7-only operator characters may appear inside them.
TEXT_NODES = frozenset(
    {
        "comment",
        "expandable_string_literal",
        "verbatim_string_characters",
        "expandable_here_string_literal",
        "verbatim_here_string_characters",
    }
)
# Parameters that exist only in PowerShell 6/7 (ForEach-Object -Parallel, ConvertTo-Json -AsArray, ...).
PS7_PARAMETERS = frozenset({"-parallel", "-asarray", "-ashashtable", "-enumsasstrings", "-throttlelimit"})


def source(name: str) -> bytes:
    """The script exactly as Run Command receives it (common.ps1 included)."""
    return ("\n".join(SCRIPTS[name].lines) + "\n").encode("ascii")


def test_both_scripts_include_the_shared_helpers_once_and_nothing_is_left_unresolved() -> None:
    common = resources.files("shared.guest").joinpath("common.ps1").read_text(encoding="utf-8").splitlines()
    for name, script in SCRIPTS.items():
        text = "\n".join(script.lines)
        assert "@include" not in text, name
        assert "\n".join(common) in text, name
        raw = resources.files("shared.guest").joinpath(f"{name}.ps1").read_text(encoding="utf-8")
        assert raw.count("# @include common.ps1") == 1


def walk(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from walk(child)


def code_nodes(node: Node) -> Iterator[Node]:
    """Every node outside strings and comments (sub-expressions inside strings are code again)."""
    if node.type not in TEXT_NODES:
        yield node
    for child in node.children:
        yield from code_nodes(child)


def text(node: Node) -> str:
    return (node.text or b"").decode("utf-8", "replace")


def syntax_errors(src: bytes) -> list[str]:
    tree = PARSER.parse(src)
    return [
        f"{n.start_point}: {'missing' if n.is_missing else 'error'} {text(n)[:40]!r}"
        for n in walk(tree.root_node)
        if n.type == "ERROR" or n.is_missing
    ]


def ps7_constructs(src: bytes) -> list[str]:
    """PowerShell 7-only syntax, found on the token tree: ?? ??= ?. ?[ ternary, && ||, PS7-only parameters."""
    found: list[str] = []
    for node in code_nodes(PARSER.parse(src).root_node):
        token = text(node).strip()
        if node.type == "pipeline_chain_tail" or (node.child_count == 0 and token in ("&&", "||")):
            found.append(f"{node.start_point}: pipeline chain {token!r}")
        elif node.child_count == 0 and token.startswith("?") and node.type != "command_name":
            found.append(f"{node.start_point}: null-conditional or ternary {token!r}")
        elif node.type == "command_parameter" and token.lower() in PS7_PARAMETERS:
            found.append(f"{node.start_point}: PowerShell 7 parameter {token!r}")
    return found


def code_text(src: bytes) -> str:
    """The script with comments removed (strings kept)."""
    tree = PARSER.parse(src)
    out = bytearray(src)
    for node in walk(tree.root_node):
        if node.type == "comment":
            out[node.start_byte : node.end_byte] = b" " * (node.end_byte - node.start_byte)
    return out.decode("ascii")


def declared_parameters(src: bytes) -> dict[str, str]:
    """Name -> type of the script-level param block."""
    root = PARSER.parse(src).root_node
    blocks = [child for child in root.children if child.type == "param_block"]
    assert len(blocks) == 1, "exactly one script-level param block"
    params: dict[str, str] = {}
    for node in walk(blocks[0]):
        if node.type == "script_parameter":
            variables = [text(n) for n in walk(node) if n.type == "variable"]
            types = [text(n) for n in walk(node) if n.type == "type_literal"]
            params[variables[0].lstrip("$")] = types[0] if types else ""
    return params


def contract_parameters() -> dict[str, set[str]]:
    table: dict[str, set[str]] = {}
    for line in CONTRACT.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"\| (detect|remediate) \| `(\w+)` \| .* \|", line)
        if match:
            table.setdefault(match.group(1), set()).add(match.group(2))
    return table


# --- syntax ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_script_parses_without_errors(name: str) -> None:
    assert syntax_errors(source(name)) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda s: s.replace(b"param(", b"param(\n    [string]$Broken = ", 1),
        lambda s: s.replace(b"[ordered]@{", b"[ordered]@{ (", 1),
        lambda s: s[: s.rindex(b"}")],  # drop the last closing brace
        lambda s: s.replace(b"catch {", b"catch ", 1),
    ],
)
@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_a_broken_copy_is_detected(name: str, breakage: object) -> None:
    assert callable(breakage)
    broken = breakage(source(name))
    assert broken != source(name)
    assert syntax_errors(broken), "the syntax check must be able to fail"


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_script_has_no_powershell_7_syntax(name: str) -> None:
    assert ps7_constructs(source(name)) == []


@pytest.mark.parametrize(
    "snippet",
    [
        b"$a = $b ?? 'x'",
        b"$a ??= 3",
        b"$n = $product?.Name",
        b"$n = $list?[0]",
        b"$s = $ok ? 'yes' : 'no'",
        b"Get-Thing && Write-Output 'done'",
        b"Get-Thing || exit 1",
        b"1..3 | ForEach-Object -Parallel { $_ }",
        b"$json = ConvertTo-Json -InputObject $x -AsArray",
        b'$q = "a$($b ?? 2)"',
    ],
)
def test_ps7_check_flags_ps7_only_syntax(snippet: bytes) -> None:
    assert ps7_constructs(snippet)


@pytest.mark.parametrize(
    "snippet",
    [
        b"$x = 'a && b ?? c || d ?. e'",
        b'$x = "a && b ? c : d"',
        b"# a ?? b && c",
        b"$h = @'\nx ?? y && z\n'@",
        b"Get-Process | ? { $_.Id -gt 4 }",
        b"if ($a -and $b -or $c) { 1 }",
        b"$p = '\\A[0-9]?\\z'",
    ],
)
def test_ps7_check_ignores_strings_comments_and_the_where_alias(snippet: bytes) -> None:
    assert ps7_constructs(snippet) == []


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_script_is_ascii_and_uses_no_slmgr_or_dynamic_code(name: str) -> None:
    src = source(name)
    assert src.isascii()
    code = code_text(src).lower()
    for forbidden in ("slmgr", "cscript", "invoke-expression", "iex ", "add-type", "[scriptblock]::create"):
        assert forbidden not in code, forbidden


# --- contract ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_first_line_is_the_marker(name: str) -> None:
    first = source(name).decode("ascii").splitlines()[0]
    assert first == f"# avma-remediator guest script: {name} v2"
    assert SCRIPTS[name].name == name
    assert SCRIPTS[name].version == 2
    assert SCRIPTS[name].lines[0] == first


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_param_block_matches_the_contract_table(name: str) -> None:
    declared = declared_parameters(source(name))
    assert set(declared) == contract_parameters()[name]
    assert set(declared.values()) == {"[string]"}, "Run Command passes strings only"


def test_contract_table_lists_both_scripts() -> None:
    table = contract_parameters()
    assert table == {
        "detect": {"KmsHost", "KmsPort"},
        "remediate": {"ProductKey", "KmsHost", "KmsPort", "InstallKey"},
    }


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_script_prints_the_marker_and_reads_the_windows_product(name: str) -> None:
    code = code_text(source(name))
    assert f"$ResultMarker = '{RESULT_MARKER}'" in code
    assert f"$WindowsAppId = '{WINDOWS_APPLICATION_ID}'" in code
    assert "PartialProductKey IS NOT NULL" in code
    assert "LicenseIsAddon" in code
    assert "ConvertTo-Json -InputObject $Result -Compress -Depth 5" in code
    # The marker line is the script's last output.
    assert code.rstrip().splitlines()[-1] == "Write-Result $result"
    for fact in (
        "Win32_OperatingSystem",
        "EditionID",
        "OperatingSystemSKU",
        "ProductKeyChannel",
        "BeginConnect",
    ):
        assert fact in code


def test_both_scripts_share_the_same_helpers() -> None:
    def helpers(src: bytes) -> str:
        body = src.decode("ascii")
        return body[body.index("# --- helpers") : body.index("\n# --- ", body.index("# --- helpers") + 1)]

    assert helpers(source("detect")) == helpers(source("remediate"))


def test_remediation_steps_run_in_contract_order_with_the_documented_wmi_calls() -> None:
    code = code_text(source("remediate"))
    names = re.findall(r"Invoke-Step '([a-z-]+)'", code)
    assert tuple(names) == STEP_NAMES
    contract = CONTRACT.read_text(encoding="utf-8")
    for name in STEP_NAMES:
        assert f"| `{name}` |" in contract
    calls = [
        "InstallProductKey($ProductKey)",
        "ClearKeyManagementServiceMachine()",
        "ClearKeyManagementServicePort()",
        "SetKeyManagementServiceMachine($KmsHost)",
        "SetKeyManagementServicePort($port)",
        "RefreshLicenseStatus()",
        "Activate()",
    ]
    positions = [code.index(call) for call in calls]
    assert positions == sorted(positions)


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_script_validates_its_parameters(name: str) -> None:
    code = code_text(source(name))
    assert "$KmsHost -cnotmatch $HostPattern" in code
    assert "$KmsPort -cnotmatch $PortPattern" in code
    assert "New-ScriptError 'parameters'" in code
    if name == "remediate":
        assert "$ProductKey -cnotmatch $KeyPattern" in code


def _ps_pattern(name: str, variable: str) -> re.Pattern[str]:
    match = re.search(rf"^\${variable} = '([^']*)'$", source(name).decode("ascii"), re.MULTILINE)
    assert match, variable
    # .NET \z is Python \Z; both scripts use \A ... \z anchors.
    return re.compile(match.group(1).replace(r"\z", r"\Z"))


@given(st.text(max_size=80) | st.from_regex(r"[a-z0-9.-]{1,70}", fullmatch=True))
def test_script_host_check_agrees_with_the_builder(value: str) -> None:
    in_script = _ps_pattern("detect", "HostPattern").match(value) is not None
    try:
        detect_command(value, 1688)
        in_python = True
    except ValueError:
        in_python = False
    assert in_script == in_python


@given(st.text(max_size=40) | st.from_regex(r"[A-Z0-9]{5}(-[A-Z0-9]{5}){4}\n?", fullmatch=True))
def test_script_key_check_agrees_with_the_builder(value: str) -> None:
    in_script = _ps_pattern("remediate", "KeyPattern").match(value) is not None
    try:
        remediate_command(product_key=value, kms_host=HOST, kms_port=1688)
        in_python = True
    except ValueError:
        in_python = False
    assert in_script == in_python


def test_script_patterns_are_identical_in_both_scripts() -> None:
    for variable in ("HostPattern", "PortPattern"):
        assert _ps_pattern("detect", variable).pattern == _ps_pattern("remediate", variable).pattern


# --- Run Command bodies --------------------------------------------------------------------------


def test_detect_command_body() -> None:
    body = detect_command(HOST, 1688)
    assert body == {
        "commandId": "RunPowerShellScript",
        "script": list(DETECT.lines),
        "parameters": [{"name": "KmsHost", "value": HOST}, {"name": "KmsPort", "value": "1688"}],
    }
    assert body["script"] == source("detect").decode("ascii").splitlines()
    json.dumps(body)  # serialisable as the REST body


def test_remediate_command_body_with_a_key() -> None:
    body = remediate_command(product_key=GOOD_KEY, kms_host=HOST, kms_port=1688)
    assert body["commandId"] == "RunPowerShellScript"
    assert body["script"] == list(REMEDIATE.lines)
    assert body["parameters"] == [
        {"name": "ProductKey", "value": GOOD_KEY},
        {"name": "KmsHost", "value": HOST},
        {"name": "KmsPort", "value": "1688"},
        {"name": "InstallKey", "value": "1"},
    ]


def test_remediate_command_body_without_a_key_only_repairs_the_kms_setting() -> None:
    body = remediate_command(product_key=None, kms_host="kms.core.usgovcloudapi.net", kms_port=1688)
    assert body["parameters"] == [
        {"name": "KmsHost", "value": "kms.core.usgovcloudapi.net"},
        {"name": "KmsPort", "value": "1688"},
        {"name": "InstallKey", "value": "0"},
    ]


def test_every_catalog_key_is_accepted() -> None:
    for entry in CATALOG:
        body = remediate_command(product_key=entry.product_key, kms_host=HOST, kms_port=1688)
        assert {"name": "ProductKey", "value": entry.product_key} in body["parameters"]


def test_builders_hand_out_copies_of_the_script_lines() -> None:
    body = detect_command(HOST, 1688)
    body["script"].append("Remove-Item C:\\ -Recurse")
    assert detect_command(HOST, 1688)["script"] == list(DETECT.lines)
    assert isinstance(scripts.DETECT.lines, tuple)


@pytest.mark.parametrize(
    "key",
    [
        "ABCDE-ABCDE-ABCDE-ABCDE-ABCDE; Remove-Item C:\\ -Recurse",
        "ABCDE-ABCDE-ABCDE-ABCDE-ABCDE\n",
        "ABCDE-ABCDE-ABCDE-ABCDE-ABCDE'",
        "abcde-abcde-abcde-abcde-abcde",
        "ABCDE-ABCDE-ABCDE-ABCDE",
        "ABCDEABCDEABCDEABCDEABCDE",
        " ABCDE-ABCDE-ABCDE-ABCDE-ABCDE",
        "ABCDE-ABCDE-ABCDE-ABCDE-ABCD$",
        "$(Remove-Item C:\\)",
        "",
    ],
)
def test_remediate_rejects_a_bad_key(key: str) -> None:
    with pytest.raises(ValueError, match="product key"):
        remediate_command(product_key=key, kms_host=HOST, kms_port=1688)


@pytest.mark.parametrize(
    "host",
    [
        "azkms.core.windows.net; Remove-Item C:\\",
        "azkms core.windows.net",
        "'azkms.core.windows.net'",
        '"azkms.core.windows.net"',
        "azkms.core.windows.net\n",
        "azkms.core.windows.net`",
        "$(whoami)",
        "azkms.core.windows.net:1688",
        "-azkms.core.windows.net",
        "azkms..core.windows.net",
        "a" * 64 + ".example.com",
        ".".join(["a" * 60] * 5),  # 304 characters
        "",
        "äzkms.core.windows.net",
    ],
)
def test_builders_reject_a_bad_host(host: str) -> None:
    with pytest.raises(ValueError, match="host"):
        detect_command(host, 1688)
    with pytest.raises(ValueError, match="host"):
        remediate_command(product_key=GOOD_KEY, kms_host=host, kms_port=1688)


@pytest.mark.parametrize("port", [0, -1, 65536, True, "1688", 1688.0, None])
def test_builders_reject_a_bad_port(port: object) -> None:
    with pytest.raises(ValueError, match="port"):
        detect_command(HOST, port)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port"):
        remediate_command(product_key=None, kms_host=HOST, kms_port=port)  # type: ignore[arg-type]


@pytest.mark.parametrize("port", [1, 1688, 65535])
def test_builders_accept_the_port_range(port: int) -> None:
    assert detect_command(HOST, port)["parameters"][1] == {"name": "KmsPort", "value": str(port)}


HOSTS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True) | st.text(
    max_size=60
)
KEYS = st.sampled_from([entry.product_key for entry in CATALOG]) | st.text(max_size=40)


@given(host=HOSTS, key=KEYS, port=st.integers(-5, 70000))
def test_caller_text_never_reaches_the_script_lines(host: str, key: str, port: int) -> None:
    builders: list[Callable[[], RunCommandInput]] = [
        lambda: detect_command(host, port),
        lambda: remediate_command(product_key=key, kms_host=host, kms_port=port),
        lambda: remediate_command(product_key=None, kms_host=host, kms_port=port),
    ]
    for build in builders:
        try:
            body = build()
        except ValueError:
            continue
        assert body["script"] in (list(DETECT.lines), list(REMEDIATE.lines))
        assert {p["name"]: p["value"] for p in body["parameters"]}["KmsHost"] == host


def test_canary_values_appear_only_as_parameter_values() -> None:
    canary_host = "canary-7f3a9.example.net"
    body = remediate_command(product_key=GOOD_KEY, kms_host=canary_host, kms_port=4242)
    joined = "\n".join(body["script"])
    assert canary_host not in joined
    assert GOOD_KEY not in joined
    assert "4242" not in joined
    assert {"name": "KmsHost", "value": canary_host} in body["parameters"]


# --- size of the printed line --------------------------------------------------------------------


def _limits(name: str) -> dict[str, int]:
    """Field -> maximum length, as the script cuts it (Get-ShortText / Get-OptionalString)."""
    found = re.findall(
        r"^\s+(\w+)\s+=\s+Get-(?:ShortText|OptionalString) .* (\d+)$", code_text(source(name)), re.MULTILINE
    )
    return {field: int(limit) for field, limit in found}


def test_worst_case_result_line_stays_well_under_4_kb() -> None:
    limits = _limits("remediate")
    assert limits == _limits("detect")
    error_text = 160  # Get-ErrorText cuts at 160; KmsHost is at most 253 ASCII characters
    assert "return (Get-ShortText $text 160)" in code_text(source("detect"))
    filler = "x"
    document = {
        "schema": 2,
        "script": "remediate",
        "os": {
            "caption": filler * limits["caption"],
            "version": filler * limits["version"],
            "build": 4294967295,
            "productType": 4294967295,
            "sku": 4294967295,
            "editionId": filler * limits["editionId"],
        },
        "license": {
            "name": filler * limits["name"],
            "description": filler * limits["description"],
            "productKeyChannel": filler * limits["productKeyChannel"],
            "partialProductKey": filler * limits["partialProductKey"],
            "licenseStatus": 6,
            "graceMinutes": 4294967295,
            "kmsMachine": filler * limits["kmsMachine"],
            "kmsPort": 65535,
            "discoveredKmsMachine": filler * limits["discoveredKmsMachine"],
            "discoveredKmsPort": 65535,
        },
        "kmsProbe": {"host": "h" * 253, "port": 65535, "reachable": False, "error": filler * error_text},
        "attestation": None,
        "steps": [{"name": name, "hresult": "0x00000000"} for name in STEP_NAMES],
        "error": {"step": "read-license", "hresult": "0x80004005", "message": filler * limits["message"]},
    }
    line = RESULT_MARKER + json.dumps(document, separators=(",", ":"))
    assert len(line.encode("ascii")) < 3000
    assert parse_result(line, expected_script="remediate").license is not None
