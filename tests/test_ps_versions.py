"""What each guest script needs from Windows PowerShell, checked on the tree-sitter AST.

Windows PowerShell parses a whole file before it runs any of it, so (1) nothing anywhere in a script
may need more than 2.0 to *parse* (else 2.0 never reaches the guard), (2) the param block and the
version guard may need nothing beyond 2.0 to *run*, and (3) nothing may need more than 3.0 to run.
Every command, parameter, type, member, automatic variable and syntax node the scripts use is looked
up in tests/data/ps-min-versions.json, which carries a source per row; a name that is not in the
table fails the test, so a new cmdlet or member comes with its source. docs/guest-contract.md shows
the same table.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tree_sitter_powershell as tsp
from tree_sitter import Language, Node, Parser

from shared.guest.scripts import DETECT, REMEDIATE

PARSER = Parser(Language(tsp.language()))
ROOT = Path(__file__).resolve().parents[1]
TABLE_PATH = ROOT / "tests" / "data" / "ps-min-versions.json"
TABLE = json.loads(TABLE_PATH.read_text(encoding="utf-8"))
SCRIPTS = {"detect": DETECT, "remediate": REMEDIATE}
CATEGORIES = ("commands", "parameters", "types", "members", "variables", "syntax")
# Leaves whose text is data (comments, string characters): their node type is looked up, not their text.
TEXT_LEAVES = frozenset({"comment", "verbatim_string_characters", "verbatim_here_string_characters"})


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


@dataclass(frozen=True)
class Use:
    category: str
    key: str
    line: int


def source(name: str) -> bytes:
    return ("\n".join(SCRIPTS[name].lines) + "\n").encode("ascii")


def text(node: Node) -> str:
    return (node.text or b"").decode("utf-8", "replace")


def walk(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from walk(child)


def _variable_name(token: str) -> str:
    name = token.lstrip("$@").lower()
    return name.split(":", 1)[1] if ":" in name else name


def defined_names(root: Node) -> tuple[set[str], set[str]]:
    """Functions the script defines and variables it assigns or declares (lower case)."""
    functions = {
        text(child).lower()
        for node in walk(root)
        if node.type == "function_statement"
        for child in node.children
        if child.type == "function_name"
    }
    variables: set[str] = set()
    for node in walk(root):
        if node.type in ("left_assignment_expression", "script_parameter", "foreach_statement"):
            first = next((n for n in walk(node) if n.type == "variable"), None)
            if first is not None:
                variables.add(_variable_name(text(first)))
    return functions, variables


def uses(node: Node, functions: set[str], variables: set[str]) -> Iterator[Use]:
    """Every use under ``node`` that the table must know."""
    for n in walk(node):
        line = n.start_point[0] + 1
        yield Use("syntax", n.type, line)
        if n.type in TEXT_LEAVES:
            continue
        if n.type == "command":
            yield from _command(n, functions, line)
        elif n.type == "type_literal":
            yield Use("types", text(n)[1:-1].strip().lower(), line)
        elif n.type in ("member_access", "invokation_expression"):
            member = next((c for c in n.children if c.type == "member_name"), None)
            if member is None:
                continue
            if any(c.type == "::" for c in n.children):
                yield Use("members", f"{text(n.children[0]).lower()}::{text(member).lower()}", line)
            else:
                yield Use("members", text(member).lower(), line)
        elif n.type == "variable":
            token = text(n).lower()
            if ":" in token:
                yield Use("variables", token.split(":", 1)[0] + ":", line)
            if _variable_name(token) not in variables:
                yield Use("variables", "$" + _variable_name(token), line)


def _command(node: Node, functions: set[str], line: int) -> Iterator[Use]:
    names = [c for c in node.children if c.type == "command_name"]
    if not names:
        yield Use("commands", "&", line)  # the call operator: & $Action
        return
    name = text(names[0]).lower()
    if name in functions:
        return
    yield Use("commands", name, line)
    elements = [e for c in node.children if c.type == "command_elements" for e in c.children]
    for element in elements:
        if element.type == "command_parameter":
            yield Use("parameters", f"{name} {text(element).lower()}", line)
    if name == "new-object":
        positional = [e for e in elements if e.type == "generic_token"]
        if positional:
            yield Use("types", text(positional[0]).lower(), line)


def lookup(use: Use) -> list[str] | None:
    rows: dict[str, list[str]] = TABLE[use.category]
    row = rows.get(use.key)
    if row is None and use.category == "members" and "::" in use.key:
        row = rows.get("*::" + use.key.split("::", 1)[1])  # a static member of any type, e.g. ::new
    return row


def script_uses(src: bytes) -> tuple[Node, list[Use]]:
    root = PARSER.parse(src).root_node
    functions, variables = defined_names(root)
    return root, list(uses(root, functions, variables))


def unknown(found: list[Use]) -> list[str]:
    return sorted({f"{u.category}: {u.key}" for u in found if lookup(u) is None})


def needs(found: list[Use], field: int) -> tuple[tuple[int, ...], list[str]]:
    """Highest version among ``found`` (field 0 = parse, 1 = run) and the uses that need it."""
    best: tuple[int, ...] = (1, 0)
    culprits: list[str] = []
    for use in found:
        row = lookup(use)
        assert row is not None, f"{use.category}: {use.key}"
        value = version(row[field])
        if value > best:
            best, culprits = value, []
        if value == best:
            culprits.append(f"line {use.line}: {use.category} {use.key}")
    return best, culprits


def guard_uses(src: bytes) -> list[Use]:
    """Uses in the param block and the statement after it (the guard): all that runs on 2.0."""
    root = PARSER.parse(src).root_node
    functions, variables = defined_names(root)
    params = [child for child in root.children if child.type == "param_block"]
    lists = [child for child in root.children if child.type == "statement_list"]
    assert len(params) == 1 and len(lists) == 1
    first = next(node for node in lists[0].children if node.type != "comment")
    assert first.type == "if_statement" and "$PSVersionTable" in text(first)
    before = [child for child in root.children if child.end_byte <= first.start_byte]
    assert {child.type for child in before} <= {"comment", "param_block"}
    found: list[Use] = []
    for node in [*params, first]:
        found += uses(node, functions, variables)
    return found


# --- the table ------------------------------------------------------------------------------------


def test_table_rows_are_well_formed_and_sourced() -> None:
    assert set(CATEGORIES) <= set(TABLE)
    prefixes = tuple(TABLE["sources"])
    for category in CATEGORIES:
        for key, row in TABLE[category].items():
            assert key == key.lower() or category == "syntax", key
            assert len(row) == 3, (category, key)
            parse, run, cited = row
            assert version(parse) <= version(run), (category, key)
            assert cited.startswith(prefixes) or cited.startswith("MicrosoftDocs/"), (category, key, cited)


def test_table_holds_the_versions_the_brief_names() -> None:
    rows = {(c, k): TABLE[c][k] for c in CATEGORIES for k in TABLE[c]}
    assert rows[("types", "ordered")][:2] == ["2.0", "3.0"]  # parses in 2.0, runs from 3.0
    assert rows[("syntax", "-in")][:2] == ["3.0", "3.0"]  # a parse error in 2.0
    assert rows[("syntax", "-notin")][:2] == ["3.0", "3.0"]
    for command in ("get-ciminstance", "convertto-json", "convertfrom-json", "remove-typedata"):
        assert rows[("commands", command)][1] == "3.0"
    assert rows[("parameters", "invoke-restmethod -noproxy")][1] == "6.0"


def test_the_psitem_row_cites_the_2_0_reference_that_lacks_it() -> None:
    """The 3.0 page only lists $PSItem; that it is new in 3.0 comes from the 2.0 page, which does not."""
    cited = TABLE["variables"]["$psitem"][2]
    assert "dd347675(v=technet.10)" in cited and "Applies To: Windows PowerShell 2.0" in cited
    assert "working-with-the-new-psitem-automatic-variable-in-windows-powershell-3-0" in cited


# --- the scripts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_every_use_in_the_script_is_in_the_table(name: str) -> None:
    _, found = script_uses(source(name))
    assert unknown(found) == []


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_the_whole_script_parses_in_windows_powershell_2_0(name: str) -> None:
    _, found = script_uses(source(name))
    best, culprits = needs(found, 0)
    assert best <= (2, 0), culprits


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_nothing_in_the_script_needs_more_than_3_0(name: str) -> None:
    _, found = script_uses(source(name))
    best, culprits = needs(found, 1)
    assert best == (3, 0), culprits  # it does need 3.0 ([ordered], Get-CimInstance, ConvertTo-Json)


@pytest.mark.parametrize("name", ["detect", "remediate"])
def test_the_param_block_and_the_guard_need_only_2_0(name: str) -> None:
    best, culprits = needs(guard_uses(source(name)), 1)
    assert best <= (2, 0), culprits


# --- the check can fail ---------------------------------------------------------------------------

GUARD = (
    "param([string]$KmsHost = '')\n"
    "if ($null -eq $PSVersionTable -or $PSVersionTable.PSVersion.Major -lt 3) {\n"
    "    Write-Output ('x' + $KmsHost)\n"
    "    exit\n"
    "}\n"
)


def test_a_clean_snippet_passes() -> None:
    _, found = script_uses(GUARD.encode())
    assert unknown(found) == []
    assert needs(found, 0)[0] <= (2, 0)
    assert needs(guard_uses(GUARD.encode()), 1)[0] <= (2, 0)


@pytest.mark.parametrize(
    "snippet",
    [
        "if ($KmsHost -in @('a', 'b')) { exit }\n",
        "$ok = $KmsHost -notin @('a')\n",
        "$n = 1 -shl 2\n",
        "class Probe { }\n",
        "Write-Output 'a' && Write-Output 'b'\n",
    ],
)
def test_syntax_that_2_0_cannot_parse_is_flagged_anywhere_in_the_file(snippet: str) -> None:
    _, found = script_uses((GUARD + "\n" + snippet).encode())
    assert unknown(found) == []
    assert needs(found, 0)[0] > (2, 0)


@pytest.mark.parametrize(
    "inside",
    [
        "$r = [ordered]@{ a = 1 }",
        "$j = ConvertTo-Json -InputObject 1 -Compress",
        "$o = Get-CimInstance -ClassName Win32_OperatingSystem",
    ],
)
def test_a_guard_that_needs_3_0_is_flagged(inside: str) -> None:
    src = GUARD.replace("    exit\n", f"    {inside}\n    exit\n").encode()
    best, _ = needs(guard_uses(src), 1)
    assert best == (3, 0)


@pytest.mark.parametrize(
    "snippet",
    [
        "$r = Invoke-RestMethod -Uri 'http://x' -NoProxy\n",
        "$b = [System.Text.StringBuilder]::new()\n",
    ],
)
def test_something_beyond_3_0_is_flagged(snippet: str) -> None:
    _, found = script_uses((GUARD + snippet).encode())
    assert unknown(found) == []
    assert needs(found, 1)[0] > (3, 0)


@pytest.mark.parametrize(
    "snippet",
    [
        "Get-Frobnicator -Name x\n",
        "Write-Output -NoEnumerate 1\n",
        "$t = [System.Collections.Generic.HashSet[string]]$x\n",
        "$v = $KmsHost.Normalize()\n",
        "$v = $PSScriptRoot\n",
        "$w = [System.IO.File]::ReadAllText('x')\n",
    ],
)
def test_an_unknown_name_fails(snippet: str) -> None:
    _, found = script_uses((GUARD + snippet).encode())
    assert unknown(found) != []
