"""The guest scripts: valid Windows PowerShell 3.0-5.1 syntax, the version guard, the contract's
parameters and marker, and Run Command bodies in which caller text can only ever be a parameter value."""

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
from shared.decide import AZURE_EDITION_PREFIX, imds_http_status, is_azure_edition
from shared.guest import scripts
from shared.guest.facts import (
    POWERSHELL_VERSION_STEP,
    RESULT_MARKER,
    STEP_NAMES,
    WINDOWS_APPLICATION_ID,
    WRITE_RESULT_STEP,
    AttestationFacts,
    OsFacts,
    parse_result,
)
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
        "remediate": {
            "ProductKey",
            "KmsHost",
            "KmsPort",
            "InstallKey",
            # the conditional re-key's (issue 12)
            "ExpectChannel",
            "ExpectEditionIds",
            "ExpectSkus",
            "ExpectBuild",
            "ExpectProductTypes",
            "RefuseKeyChannels",
        },
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
    assert code.rstrip().splitlines()[-1] == (
        "Write-Result $result $steps" if name == "remediate" else "Write-Result $result"
    )
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


# Windows PowerShell 5.1's ConvertTo-Json serialises with JavaScriptSerializer, whose strings go through
# HttpUtility.JavaScriptStringEncode (PowerShell/PowerShell 60b3b304 ConvertToJsonCommand.cs, Full CLR
# branch; .NET reference source System.Web/Util/HttpEncoder.cs); Write-Result then writes every
# character above 126 as \uXXXX. This is that output, byte for byte, for the values the scripts emit.
_SHORT_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def ps51_escape(character: str) -> str:
    code = ord(character)
    if character in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[character]
    if code < 0x20 or character in "'<>&" or code in (0x85, 0x2028, 0x2029) or code > 126:
        return f"\\u{code:04x}"
    return character


def ps51_json(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(ps51_escape(c) for c in utf16_units(value)) + '"'
    if isinstance(value, list):
        return "[" + ",".join(ps51_json(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ",".join(ps51_json(k) + ":" + ps51_json(v) for k, v in value.items()) + "}"


def script_cost() -> Callable[[str], int]:
    """Get-JsonCost as the script writes it, read from its source."""
    body = text(function_node(source("detect"), "Get-JsonCost"))
    rules: list[tuple[list[tuple[str, int]], int]] = []
    for condition, cost in re.findall(r"if \((.*)\) \{ return (\d+) \}", body):
        terms = [(op, int(n)) for op, n in re.findall(r"\$Code -(lt|gt|eq) (\d+)", condition)]
        assert " -or ".join(f"$Code -{op} {n}" for op, n in terms) == condition, condition
        rules.append((terms, int(cost)))
    default = re.findall(r"^\s+return (\d+)\s*$", body, re.MULTILINE)
    assert len(rules) >= 3 and len(default) == 1

    def cost(character: str) -> int:
        code = ord(character)
        for terms, value in rules:
            if any({"lt": code < n, "gt": code > n, "eq": code == n}[op] for op, n in terms):
                return value
        return int(default[0])

    return cost


def utf16_units(value: str) -> list[str]:
    """The UTF-16 code units of ``value``, one str each: what PowerShell's [string] indexes."""
    raw = value.encode("utf-16-le", "surrogatepass")
    return [chr(int.from_bytes(raw[i : i + 2], "little")) for i in range(0, len(raw), 2)]


def from_units(units: list[str]) -> str:
    return "".join(units).encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def short_text(value: str, limit: int, cost: Callable[[str], int]) -> str:
    """Get-ShortText on UTF-16 units: cut where the next unit's cost would pass the limit, one unit
    earlier when that would leave the first half of a surrogate pair at the end."""
    units = utf16_units(value)
    length = 0
    for index, unit in enumerate(units):
        if length + cost(unit) > limit:
            if index > 0 and 0xD800 <= ord(units[index - 1]) <= 0xDBFF:
                index -= 1
            return from_units(units[:index])
        length += cost(unit)
    return value


def test_the_scripts_charge_at_least_what_powershell_5_1_writes_for_every_character() -> None:
    cost = script_cost()
    short = [chr(c) for c in range(0x10000) if cost(chr(c)) < len(ps51_escape(chr(c)))]
    assert short == []
    # the characters item 6 is about
    assert [cost(c) for c in "'<>&"] == [6, 6, 6, 6]
    assert [cost(c) for c in '"\\'] == [2, 2]
    assert cost("x") == 1


def test_get_short_text_never_ends_on_the_first_half_of_a_surrogate_pair() -> None:
    """A cut between the halves of a pair would print a lone \\ud83d: not text (the parser turns it
    into U+FFFD, but the script should not write it)."""
    body = text(function_node(source("detect"), "Get-ShortText"))
    assert "$before -gt 55295 -and $before -lt 56320" in body
    assert "return $text.Substring(0, $i - 1)" in body
    cost = script_cost()
    for prefix in range(4):
        for limit in (10, 40, 60, 120, 160, 255):
            cut = short_text("a" * prefix + "\U0001f600" * 60, limit, cost)
            units = utf16_units(cut)
            assert not units or not 0xD800 <= ord(units[-1]) <= 0xDBFF, (prefix, limit)
            assert len(ps51_json(cut)) - 2 <= limit
            cut.encode("utf-8")  # no half pair left: encodable


FILLERS = ["x", "<", "'", "&", '"', "\\", "\x01", "\u00e9", "\U0001f600", "a<b\"c\\d&e'f\u00e9"]


def _worst_document(filler: str, script: str) -> dict[str, object]:
    limits = _limits("remediate")
    cost = script_cost()

    def cut(field: str) -> str:
        return short_text(filler * 400, limits[field], cost)

    error_text = short_text(filler * 400, 160, cost)  # Get-ErrorText cuts at 160
    return {
        "schema": 2,
        "script": script,
        "os": {
            "caption": cut("caption"),
            "version": cut("version"),
            "build": 4294967295,
            "productType": 4294967295,
            "sku": 4294967295,
            "editionId": cut("editionId"),
        },
        "license": {
            "name": cut("name"),
            "description": cut("description"),
            "productKeyChannel": cut("productKeyChannel"),
            "partialProductKey": cut("partialProductKey"),
            "licenseStatus": 6,
            "graceMinutes": 4294967295,
            "kmsMachine": cut("kmsMachine"),
            "kmsPort": 65535,
            "discoveredKmsMachine": cut("discoveredKmsMachine"),
            "discoveredKmsPort": 65535,
        },
        # KmsHost passed the host-name check: at most 253 ASCII characters, none escaped
        "kmsProbe": {"host": "h" * 253, "port": 65535, "reachable": False, "error": error_text},
        "attestation": {"imdsReachable": True, "chainValid": False, "error": cut("error")},
        "steps": [{"name": name, "hresult": "0x00000000"} for name in STEP_NAMES]
        if script == "remediate"
        else [],
        "error": {"step": "read-license", "hresult": "0x80004005", "message": cut("message")},
    }


WORST_CASE_BYTES = 2616  # measured below; docs/guest-contract.md states it


def test_worst_case_result_line_with_escape_heavy_content_stays_well_under_4_kb() -> None:
    limits = _limits("remediate")
    assert limits == _limits("detect")
    assert limits["error"] == limits["message"] == 160
    assert "return (Get-ShortText $text 160)" in code_text(source("detect"))
    sizes: dict[str, int] = {}
    for filler in FILLERS:
        for script in ("detect", "remediate"):
            line = RESULT_MARKER + ps51_json(_worst_document(filler, script))
            assert line.isascii()
            parsed = parse_result(line, expected_script=script)
            assert parsed.license is not None and parsed.attestation is not None
            sizes[f"{script} {filler!r}"] = len(line.encode("ascii"))
    worst = max(sizes.values())
    assert worst == WORST_CASE_BYTES, sizes
    assert worst + 2 < 3000  # CRLF included: far from Run Command's 4,096-byte tail


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_error_only_lines_are_short(name: str) -> None:
    guard = top_statements(source(name))[0]
    version_line = written_line(commands(guard, "Write-Output")[0], {"$guardVersion": "2.0"})
    catch = next(n for n in walk(function_node(source(name), "Write-Result")) if n.type == "catch_clause")
    fallback = written_line(
        commands(catch, "Write-Output")[0], {"$ResultMarker": RESULT_MARKER, "$ScriptName": name}
    )
    assert len(version_line) < 300 and len(fallback) < 300


# --- AST helpers for the behaviour checks below ----------------------------------------------------


def top_statements(src: bytes) -> list[Node]:
    """The script's top-level statements after the param block, in order (comments left out)."""
    root = PARSER.parse(src).root_node
    lists = [child for child in root.children if child.type == "statement_list"]
    assert len(lists) == 1
    return [node for node in lists[0].children if node.type != "comment"]


def function_node(src: bytes, name: str) -> Node:
    found = [
        node
        for node in walk(PARSER.parse(src).root_node)
        if node.type == "function_statement"
        and any(child.type == "function_name" and text(child) == name for child in node.children)
    ]
    assert len(found) == 1, name
    return found[0]


def commands(node: Node, name: str) -> list[Node]:
    return [
        n
        for n in walk(node)
        if n.type == "command"
        and any(c.type == "command_name" and text(c).lower() == name.lower() for c in n.children)
    ]


def concatenation(node: Node, variables: dict[str, str]) -> str:
    """Value of an expression made only of single-quoted strings, known variables and ``+``."""
    parts: list[str] = []

    def visit(n: Node) -> None:
        if n.type == "string_literal":
            raw = text(n)
            assert raw.startswith("'") and raw.endswith("'"), f"not a verbatim string: {raw[:40]}"
            parts.append(raw[1:-1].replace("''", "'"))
            return
        if n.type == "variable":
            parts.append(variables[text(n)])
            return
        if n.child_count == 0:
            assert text(n) in ("+", "(", ")", " ", ""), f"not plain concatenation: {text(n)!r}"
            return
        for child in n.children:
            visit(child)

    visit(node)
    return "".join(parts)


def written_line(command: Node, variables: dict[str, str]) -> str:
    """The one value a ``Write-Output (...)`` command writes."""
    elements = [c for c in command.children if c.type == "command_elements"]
    assert len(elements) == 1
    return concatenation(elements[0], variables)


# --- item 1: the PowerShell version guard ------------------------------------------------------------


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_first_statement_after_param_is_the_version_guard(name: str) -> None:
    guard = top_statements(source(name))[0]
    assert guard.type == "if_statement"
    condition = text(guard)[: text(guard).index("{")]
    assert condition == "if ($null -eq $PSVersionTable -or $PSVersionTable.PSVersion.Major -lt 3) "
    body = next(n for n in guard.children if n.type == "statement_block")
    statements = [n for n in body.children[1].children if n.type != "comment"]
    # prints exactly one line, then exits: nothing else runs, nothing is changed
    assert len(commands(guard, "Write-Output")) == 1
    assert text(statements[-1]) == "exit"
    assert [n.type for n in walk(guard) if n.type in ("function_statement", "try_statement")] == []


@pytest.mark.parametrize("version", ["2.0", "1.0"])
@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_the_guard_line_is_a_valid_result_naming_the_version(name: str, version: str) -> None:
    guard = top_statements(source(name))[0]
    line = written_line(commands(guard, "Write-Output")[0], {"$guardVersion": version})
    assert line.isascii()
    assert line == (
        RESULT_MARKER + '{"schema":2,"script":"' + name + '","os":null,"license":null,"kmsProbe":null,'
        '"attestation":null,"steps":[],"error":{"step":"powershell-version","hresult":"0x80070032",'
        '"message":"Windows PowerShell ' + version + ' is older than 3.0"}}'
    )
    result = parse_result("some text\n" + line + "\n", expected_script=name)
    assert result.error is not None
    assert (result.error.step, result.error.hresult) == (POWERSHELL_VERSION_STEP, "0x80070032")
    assert result.error.message == f"Windows PowerShell {version} is older than 3.0"
    assert (result.os, result.license, result.kms_probe, result.attestation, result.steps) == (
        None,
        None,
        None,
        None,
        (),
    )


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_the_guard_reads_major_and_minor_and_falls_back_to_1_0(name: str) -> None:
    guard = text(top_statements(source(name))[0])
    assert "$guardVersion = '1.0'" in guard
    assert (
        "$guardVersion = [string]$PSVersionTable.PSVersion.Major + '.' + [string]$PSVersionTable.PSVersion.Minor"
        in guard
    )


# --- item 9: null product names and the write-result fallback ---------------------------------------


def test_a_product_without_name_or_description_reports_empty_strings() -> None:
    body = text(function_node(source("detect"), "Read-LicenseFacts"))
    # [string]$null is '' in PowerShell; Get-OptionalString would give $null, which the parser rejects.
    assert re.search(r"^\s+name\s+= Get-ShortText \(\[string\]\$product\.Name\) 120$", body, re.MULTILINE)
    assert re.search(
        r"^\s+description\s+= Get-ShortText \(\[string\]\$product\.Description\) 120$", body, re.MULTILINE
    )
    template = {"name": "", "description": ""}
    assert set(template) <= set(re.findall(r"^\s+(\w+)\s+=", body, re.MULTILINE))


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_write_result_writes_inside_try_and_falls_back_to_a_fixed_line(name: str) -> None:
    src = source(name)
    assert f"$ScriptName = '{name}'" in code_text(src)
    function = function_node(src, "Write-Result")
    tries = [n for n in walk(function) if n.type == "try_statement"]
    assert len(tries) == 1
    body = next(n for n in tries[0].children if n.type == "statement_block")
    catch = next(n for n in walk(tries[0]) if n.type == "catch_clause")
    assert "ConvertTo-Json" in text(body)
    assert len(commands(body, "Write-Output")) == 1, "the normal line is written inside try"
    assert len(commands(function, "Write-Output")) == 2
    fallback = written_line(
        commands(catch, "Write-Output")[0], {"$ResultMarker": RESULT_MARKER, "$ScriptName": name}
    )
    result = parse_result(fallback, expected_script=name)
    assert result.error is not None
    assert (result.error.step, result.error.hresult) == (WRITE_RESULT_STEP, "0x80004005")
    message = result.error.message
    assert message.isascii() and message and not set(message) & set("\"\\'")
    assert (result.os, result.license, result.kms_probe, result.attestation, result.steps) == (
        None,
        None,
        None,
        None,
        (),
    )


FALLBACK_VARIABLES = ("$ResultMarker", "$ScriptName")  # set at the top of each script, from constants


def statements(block: Node) -> list[Node]:
    """The statements of a statement_block or script_block_body, comments left out."""
    lists = [child for child in block.children if child.type == "statement_list"]
    return [node for statement_list in lists for node in statement_list.children if node.type != "comment"]


def fallback_problems(src: bytes, name: str) -> list[str]:
    """Why Write-Result's fallback line might not be written when building the normal line throws.

    Structure (not text): the function body is one try statement (nothing before it can throw
    uncaught), with one untyped catch and no finally; the catch's first statement is the fallback
    ``Write-Output (...)``, built only from single-quoted strings, ``$ResultMarker``/``$ScriptName``
    and ``+`` (nothing in it can throw: no call, cast, member access, sub-expression or other
    variable), so nothing in the catch runs before it.
    """
    function = function_node(src, "Write-Result")
    block = next(child for child in function.children if child.type == "script_block")
    bodies = [child for child in block.children if child.type == "script_block_body"]
    if len(bodies) != 1:
        return ["Write-Result has no body"]
    body = statements(bodies[0])
    if [node.type for node in body] != ["try_statement"]:
        return [f"the body is {[text(node)[:30] for node in body]}, not one try statement"]
    clauses = [n for n in walk(body[0]) if n.type == "catch_clause"]
    problems: list[str] = []
    if len(clauses) != 1:
        return [f"{len(clauses)} catch clauses"]
    if any(child.type == "finally_clause" for child in body[0].children):
        problems.append("a finally clause runs after the fallback and may throw")
    catch = clauses[0]
    if [child.type for child in catch.children] != ["catch", "statement_block"]:
        problems.append(f"the catch is typed or odd: {text(catch)[: text(catch).index('{')]!r}")
    handler = next(child for child in catch.children if child.type == "statement_block")
    inside = statements(handler)
    if not inside:
        return [*problems, "the catch is empty"]
    first = inside[0]
    written = commands(first, "Write-Output")
    if first.type != "pipeline" or len(written) != 1 or text(first) != text(written[0]):
        return [
            *problems,
            f"the catch's first statement is {text(first)[:60]!r}, not the fallback Write-Output",
        ]
    try:
        line = written_line(written[0], {"$ResultMarker": RESULT_MARKER, "$ScriptName": name})
    except (AssertionError, KeyError) as exc:
        return [*problems, f"the fallback is not built from constants only: {exc}"]
    used = {text(n) for n in walk(written[0]) if n.type == "variable"}
    if not used <= set(FALLBACK_VARIABLES):
        problems.append(f"the fallback reads {sorted(used - set(FALLBACK_VARIABLES))}")
    try:
        parse_result(line, expected_script=name)
    except ValueError as exc:
        problems.append(f"the fallback line is not a valid result: {exc}")
    return problems


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_the_write_result_fallback_is_the_first_statement_of_its_catch_and_cannot_throw(name: str) -> None:
    assert fallback_problems(source(name), name) == []
    # the two variables are plain constants, assigned once at the top of the script
    code = code_text(source(name))
    assert code.count("$ResultMarker = ") == 1 and code.count("$ScriptName = ") == 1
    assert f"$ResultMarker = '{RESULT_MARKER}'" in code and f"$ScriptName = '{name}'" in code


FALLBACK = '        Write-Output ($ResultMarker + \'{"schema":2,'


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.replace(FALLBACK, "        throw 'again'\n" + FALLBACK),
        lambda s: s.replace(FALLBACK, "        $null = $Result.steps.Count\n" + FALLBACK),
        lambda s: s.replace(FALLBACK, "        Write-Output (Get-ErrorText $_)\n" + FALLBACK),
        lambda s: s.replace(FALLBACK, FALLBACK.replace("$ResultMarker", "$ResultMarker.Trim()")),
        lambda s: s.replace(FALLBACK, FALLBACK.replace("$ResultMarker", "[string]$ResultMarker")),
        lambda s: s.replace('"script":"\' + $ScriptName + \'"', '"script":"\' + $Result.script + \'"'),
        lambda s: s.replace(
            "    catch {\n" + FALLBACK,
            "    catch [System.Management.Automation.RuntimeException] {\n" + FALLBACK,
        ),
        lambda s: s.replace(
            "    param($Result, $Steps)\n    try {",
            "    param($Result, $Steps)\n    $Result.steps = [object[]]$Steps.ToArray()\n    try {",
        ),
        lambda s: s.replace(
            "the result line could not be built or written\"}}')\n    }\n",
            "the result line could not be built or written\"}}')\n    }\n    finally { $Steps.Clear() }\n",
        ),
    ],
    ids=[
        "throw",
        "member-read",
        "call",
        "method",
        "cast",
        "result-field",
        "typed-catch",
        "before-try",
        "finally",
    ],
)
@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_a_fallback_that_could_be_skipped_or_throw_is_caught(name: str, mutate: Callable[[str], str]) -> None:
    original = source(name).decode("ascii")
    mutant = mutate(original)
    assert mutant != original, "the mutation must apply"
    assert syntax_errors(mutant.encode("ascii")) == []
    assert fallback_problems(mutant.encode("ascii"), name) != []


# --- item 3: activate as slmgr /ato does -------------------------------------------------------------


def _step_block(name: str) -> str:
    for command in commands(PARSER.parse(source("remediate")).root_node, "Invoke-Step"):
        if f"Invoke-Step '{name}'" in text(command):
            return text(command)
    raise AssertionError(name)


def test_activate_refreshes_the_license_status_after_activate_like_slmgr_ato() -> None:
    block = _step_block("activate")
    assert "$products[0].Activate()" in block
    assert "(Get-LicensingService).RefreshLicenseStatus()" in block
    assert block.index("Activate()") < block.index("RefreshLicenseStatus()")
    # a failed Activate() is reported as such, not hidden behind the refresh
    assert "if ($activated -ne 0) { return $activated }" in block
    assert block.index("return $activated") < block.index("RefreshLicenseStatus()")


# --- P13: the product activate() and the facts use skips add-ons (ESU) --------------------------------

PRODUCT_FILTER = f"ApplicationID='{WINDOWS_APPLICATION_ID}' AND PartialProductKey IS NOT NULL"
QUERY_COMMANDS = {"get-wmiobject": "-class", "get-ciminstance": "-classname"}


def assignments(node: Node, variable: str) -> list[Node]:
    """The value nodes assigned to ``variable`` anywhere under ``node``."""
    found: list[Node] = []
    for n in walk(node):
        if n.type != "assignment_expression":
            continue
        left = next(c for c in n.children if c.type == "left_assignment_expression")
        if text(left).strip().lower() == variable.lower():
            found.append(n.children[-1])
    return found


def string_value(node: Node, variables: dict[str, str]) -> str:
    """Value of ``'...'`` / ``"..."`` strings (no ``$`` or backtick inside) and known variables joined by ``+``."""
    parts: list[str] = []
    for n in walk(node):
        if n.type == "expandable_string_literal":
            raw = text(n)
            assert raw[0] == raw[-1] == '"' and not set(raw[1:-1]) & set("$`"), raw
            parts.append(raw[1:-1])
        elif n.type == "verbatim_string_characters":
            parts.append(text(n)[1:-1].replace("''", "'"))
        elif n.type == "variable":
            parts.append(variables[text(n)])
        elif n.child_count == 0:
            assert text(n) in ("+", ""), f"not plain concatenation: {text(n)!r}"
    return "".join(parts)


def product_selection(scope: Node, variable: str) -> tuple[str, str, list[str]]:
    """Where ``variable``'s products come from: (query command, WQL filter, Where-Object filters),
    following ``$a = @(... | Where-Object {...})`` and ``$a = @($b | ...)`` back to the query."""
    values = assignments(scope, variable)
    assert len(values) == 1, f"{variable} is assigned {len(values)} times"
    arrays = [n for n in walk(values[0]) if n.type == "array_expression"]
    assert arrays and text(arrays[0]) == text(values[0]), f"{variable} is not @(...)"
    chains = [n for n in walk(arrays[0]) if n.type == "pipeline_chain"]
    elements = [c for c in chains[0].children if c.type != "|"]
    wheres: list[str] = []
    for element in elements[1:]:
        assert element.type == "command" and text(element.children[0]).lower() == "where-object", text(
            element
        )
        block = next(n for n in walk(element) if n.type == "script_block")
        wheres.append(text(block).strip())
    head = elements[0]
    if head.type != "command":
        source_variable = text(head).strip()
        assert source_variable.startswith("$"), text(head)
        query, wql, earlier = product_selection(scope, source_variable)
        return query, wql, earlier + wheres
    name = text(head.children[0]).lower()
    assert name in QUERY_COMMANDS, name
    tokens = next(c for c in head.children if c.type == "command_elements").children
    args = [c for c in tokens if c.type != "command_argument_sep"]
    pairs = {text(args[i]).lower(): args[i + 1] for i in range(0, len(args) - 1, 2)}
    assert set(pairs) == {QUERY_COMMANDS[name], "-filter"}, text(head)
    assert text(pairs[QUERY_COMMANDS[name]]) == "SoftwareLicensingProduct"
    filter_variable = text(pairs["-filter"]).strip()
    filters = assignments(scope, filter_variable)
    assert len(filters) == 1, filter_variable
    return name, string_value(filters[0], {"$WindowsAppId": WINDOWS_APPLICATION_ID}), wheres


def _activate_block(src: bytes) -> Node:
    steps = [
        command
        for command in commands(PARSER.parse(src).root_node, "Invoke-Step")
        if text(command).startswith("Invoke-Step 'activate'")
    ]
    assert len(steps) == 1
    return steps[0]


ADDON_FILTER = ["-not $_.LicenseIsAddon"]


def test_activate_picks_its_product_without_add_ons_like_the_facts() -> None:
    """Without the LicenseIsAddon filter an ESU add-on (same Windows ApplicationID, with a key) is a
    second product, Count is 2 and the step reports 0x80070490 instead of activating Windows."""
    assert selections_skip_add_ons(source("remediate"))
    block = _activate_block(source("remediate"))
    assert product_selection(block, "$products") == ("get-wmiobject", PRODUCT_FILTER, ADDON_FILTER)
    facts = function_node(source("remediate"), "Read-LicenseFacts")
    assert product_selection(facts, "$products") == ("get-ciminstance", PRODUCT_FILTER, ADDON_FILTER)
    body = text(block)
    assert "if ($products.Count -ne 1) { return [int64]2147943568 }" in body
    assert body.index("$products.Count -ne 1") < body.index("$products[0].Activate()")
    assert [text(n) for n in walk(block) if n.type == "invokation_expression" and "Activate" in text(n)] == [
        "$products[0].Activate()"
    ]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.replace(
            "$products = @(Get-WmiObject -Class SoftwareLicensingProduct -Filter $filter | Where-Object { -not $_.LicenseIsAddon })",
            "$products = @(Get-WmiObject -Class SoftwareLicensingProduct -Filter $filter)",
        ),
        lambda s: s.replace(
            "| Where-Object { -not $_.LicenseIsAddon })\n            # 0x8007",
            "| Where-Object { $_.LicenseIsAddon })\n            # 0x8007",
        ),
        lambda s: s.replace(
            '$filter = "ApplicationID=\'" + $WindowsAppId + "\' AND PartialProductKey IS NOT NULL"\n            $products',
            '$filter = "ApplicationID=\'" + $WindowsAppId + "\'"\n            $products',
        ),
        lambda s: s.replace(
            "$products = @($found | Where-Object { -not $_.LicenseIsAddon })", "$products = @($found)"
        ),
    ],
    ids=[
        "activate-no-addon-filter",
        "activate-addons-only",
        "activate-no-key-filter",
        "facts-no-addon-filter",
    ],
)
def test_a_product_selection_that_lets_add_ons_in_is_caught(mutate: Callable[[str], str]) -> None:
    original = source("remediate").decode("ascii")
    mutant = mutate(original)
    assert mutant != original, "the mutation must apply"
    src = mutant.encode("ascii")
    assert not selections_skip_add_ons(src)


def selections_skip_add_ons(src: bytes) -> bool:
    try:
        activate = product_selection(_activate_block(src), "$products")
        facts = product_selection(function_node(src, "Read-LicenseFacts"), "$products")
    except AssertionError:
        return False
    return activate == ("get-wmiobject", PRODUCT_FILTER, ADDON_FILTER) and facts == (
        "get-ciminstance",
        PRODUCT_FILTER,
        ADDON_FILTER,
    )


# --- item 8: the attestation fact on Azure Edition ---------------------------------------------------


def test_attestation_is_read_only_on_azure_edition() -> None:
    add_facts = text(function_node(source("detect"), "Add-Facts"))
    assert (
        "if ($null -ne $Result.os -and ([string]$Result.os.editionId).StartsWith("
        f"'{AZURE_EDITION_PREFIX}', [System.StringComparison]::OrdinalIgnoreCase)) {{" in add_facts
    )
    # -like / -clike would be culture-dependent or case-sensitive: the one rule is OrdinalIgnoreCase
    assert (
        "like" not in code_text(source("detect"))[code_text(source("detect")).index("function Add-Facts") :]
    )
    assert "$Result.attestation = Test-Attestation" in add_facts
    for name in ("detect", "remediate"):
        assert re.search(r"^    attestation\s+= \$null$", code_text(source(name)), re.MULTILINE)


def script_runs_attestation(edition_id: str) -> bool:
    """The script's test, String.StartsWith(prefix, OrdinalIgnoreCase), on ASCII: ordinal compare
    after ASCII upper-casing (non-ASCII characters are left out of the model: see below)."""
    head = edition_id[: len(AZURE_EDITION_PREFIX)]
    return len(head) == len(AZURE_EDITION_PREFIX) and all(
        c.isascii() and c.upper() == p.upper() for c, p in zip(head, AZURE_EDITION_PREFIX, strict=True)
    )


_LOOKALIKES = (
    "\u017f\u0131\u0130\u212a"  # long s, dotless i, dotted I, Kelvin sign: casefold/upper map some to ASCII
)
EDITION_IDS = (
    st.text(alphabet=st.sampled_from("SsEeRrVvTtUuBbIiNnCcOo " + _LOOKALIKES), max_size=18)
    | st.sampled_from(
        ["ServerTurbine", "ServerTurbineCor", "serverturbine", "SERVERTURBINECOR", "ServerDatacenter"]
    )
    | st.tuples(st.integers(0, 12), st.sampled_from(_LOOKALIKES), st.sampled_from(["", "Cor"])).map(
        lambda t: AZURE_EDITION_PREFIX[: t[0]] + t[1] + AZURE_EDITION_PREFIX[t[0] + 1 :] + t[2]
    )
)


@given(EDITION_IDS)
def test_script_and_engine_agree_on_which_edition_ids_are_azure_edition(edition_id: str) -> None:
    engine = is_azure_edition(OsFacts("c", "10.0.20348", 20348, 3, 407, edition_id))
    if engine:
        # whatever .NET does with non-ASCII letters, the script checked every VM the engine judges
        assert script_runs_attestation(edition_id)
    if edition_id[: len(AZURE_EDITION_PREFIX)].isascii():
        assert engine == script_runs_attestation(edition_id)


def test_attestation_fetches_the_attested_document_without_proxy_and_builds_the_chain() -> None:
    function = text(function_node(source("detect"), "Test-Attestation"))
    assert "'http://169.254.169.254/metadata/attested/document?api-version=2020-09-01'" in function
    assert "$request.Headers.Add('Metadata', 'true')" in function
    assert "$request.Proxy = $null" in function
    assert "$request.Timeout = 5000" in function
    assert "New-Object System.Security.Cryptography.X509Certificates.X509Chain" in function
    assert "$chain.Build($certificate)" in function
    keys = re.findall(r"^\s+(\w+)\s+=", function[function.rindex("[ordered]@{") :], re.MULTILINE)
    assert keys == ["imdsReachable", "chainValid", "error"]
    # chainValid stays null until IMDS answered
    assert (
        function.index("$chainValid = $null")
        < function.index("$reachable = $true")
        < function.index("$chainValid = $false")
    )


def test_an_imds_http_error_is_written_as_http_status_and_read_back_by_the_engine() -> None:
    """IMDS answering 429/5xx/404 is not "unreachable": the script says "HTTP <n>: ..." and the
    engine (shared.decide.imds_http_status) reads the status from exactly that prefix."""
    src = source("detect")
    function = function_node(src, "Test-Attestation")
    catch = next(n for n in walk(function) if n.type == "catch_clause")
    handler = statements(next(c for c in catch.children if c.type == "statement_block"))
    assert [text(n) for n in handler] == [
        "$problem = Get-ErrorText $_",
        "$status = Get-HttpStatus $_",
        "if ($null -ne $status) { $problem = 'HTTP ' + [string]$status + ': ' + $problem }",
    ]
    # the prefix as the script builds it, fed to the engine's reader
    assignment = next(n for n in walk(handler[2]) if n.type == "assignment_expression")
    value = text(assignment.children[-1]).replace("[string]$status", "$status")
    prefix = concatenation(
        PARSER.parse(value.encode()).root_node, {"$status": "503", "$problem": "WebException: x"}
    )
    assert prefix == "HTTP 503: WebException: x"
    facts = AttestationFacts(imds_reachable=False, chain_valid=None, error=prefix)
    assert imds_http_status(facts) == 503
    # only an HTTP answer carries a status: the WebException's Response, found through the inner exceptions
    status = text(function_node(src, "Get-HttpStatus"))
    assert (
        "if ($exception -is [System.Net.WebException] -and $exception.Response -is [System.Net.HttpWebResponse]) {"
        in status
    )
    assert "return [int]$exception.Response.StatusCode" in status
    assert "$exception = $exception.InnerException" in status
    assert status.rstrip("} \n").endswith("return $null")


def test_the_contract_cites_how_a_pkcs7_blob_loads_as_its_signers_certificate() -> None:
    contract = " ".join(CONTRACT.read_text(encoding="utf-8").split())
    claim = contract.index("is loaded as an `X509Certificate2` (the certificate that signed it")
    cited = contract[claim : claim + 900]
    assert "COMX509Certificate::GetSignerInPKCS7Store" in cited
    assert "src/classlibnative/cryptography/x509certificate.cpp" in cited
    assert "CertificatePal.Windows.Import.cs" in cited
    assert "CMSG_SIGNER_INFO_PARAM" in cited and "CERT_FIND_SUBJECT_CERT" in cited


# --- item 10: the versions the headers claim ----------------------------------------------------------


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_header_states_the_supported_powershell_versions(name: str) -> None:
    raw = resources.files("shared.guest").joinpath(f"{name}.ps1").read_text(encoding="utf-8")
    header = raw[: raw.index("param(")]
    assert "Needs Windows PowerShell 3.0 or later" in header
    assert "5.1 is the tested shape" in header
    assert "2.0 it only prints the powershell-version error line" in header
    assert "4.0 and 5.1" not in header


def test_contract_states_the_versions_and_the_version_table() -> None:
    contract = CONTRACT.read_text(encoding="utf-8")
    assert (
        "The\nscripts need Windows PowerShell 3.0 or later; 5.1 is the shape the tests hold them to"
        in contract
    )
    assert "## PowerShell versions" in contract
    table = json.loads((Path(__file__).parent / "data" / "ps-min-versions.json").read_text(encoding="utf-8"))
    three = sorted(k for k, row in table["commands"].items() if row[1] == "3.0" and k != "invoke-restmethod")
    assert three == ["convertfrom-json", "convertto-json", "get-ciminstance", "remove-typedata"]
    for command in (
        "ConvertTo-Json",
        "ConvertFrom-Json",
        "Get-CimInstance",
        "Remove-TypeData",
        "[ordered]",
        "-NoProxy",
    ):
        assert command in contract[contract.index("## PowerShell versions") :], command
    assert "**2,616 bytes**" in contract and "4.0 and 5.1" not in contract


def test_readme_states_which_windows_versions_run_command_and_the_product_support() -> None:
    readme = (CONTRACT.parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Windows versions") : readme.index("## Outcomes")]
    assert readme.index("## Using it on a real estate") < readme.index("## Windows versions")
    assert "articles/virtual-machines/windows/run-command.md" in section
    assert "Windows Server 2016, 2019, 2022 and 2025" in section
    assert "2012, 2012 R2 and 2008 R2 are not on that list" in section
    assert "| Server 2012 R2, 2012 | 4.0, 3.0 as shipped | best effort" in section
    assert "`failed: powershell-version`" in section
