"""The README's command line section cannot drift from the CLI: every option of every command is in
its table and nothing else is (compared with each command's ``--help``), the exit codes match
``--help`` and shared/exitcodes.py, the output formats match ``--output``'s choices, every key the
JSON result holds is named; and the rehearsal runs exactly as written, printing what it says."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import shared.exitcodes as exitcodes
from shared.cli import main
from shared.output import FORMATS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMANDS = ["", "sweep", "check", "apply", "intake", "simulator", "simulator serve"]


def section(name: str) -> str:
    match = re.search(rf"<!-- {name}:[^\n]*-->\n(.*?)<!-- /{name} -->", README, re.DOTALL)
    assert match is not None, f"README lost its {name} section"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows[1:]]


def help_of(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main([*command.split(), "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def help_options(text: str) -> dict[str, str]:
    """Option → its help text, from the ``options:`` block of ``--help``."""
    block = text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    options: dict[str, str] = {}
    current: list[str] = []
    for line in block.splitlines():
        stripped = line.strip()
        if stripped.startswith("-"):
            parts = re.split(r"\s{2,}", stripped, maxsplit=1)
            head, rest = parts[0], parts[1] if len(parts) > 1 else ""
            current = re.findall(r"(?:^|, )(--?[A-Za-z][\w-]*)", head)
            for name in current:
                options[name] = rest
        else:
            for name in current:
                options[name] = (options[name] + " " + stripped).strip()
    return options


def readme_options() -> dict[str, tuple[set[str], str]]:
    """Option → (the commands the README gives it, its meaning)."""
    out: dict[str, tuple[set[str], str]] = {}
    for first, commands, meaning in table_rows(section("cli-options")):
        names = re.findall(r"`(--?[A-Za-z][\w-]*)", first)
        if commands == "all":
            where = set(COMMANDS)
        elif commands == "top level":
            where = {""}
        else:
            where = set(re.findall(r"`([a-z][a-z ]*)`", commands))
        for name in names:
            out[name] = (where, meaning)
    return out


@pytest.mark.parametrize("command", COMMANDS, ids=[c or "avma-remediator" for c in COMMANDS])
def test_the_readme_lists_exactly_the_options_of_each_command(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    in_help = help_options(help_of(command, capsys))
    documented = readme_options()
    in_readme = {name for name, (where, _) in documented.items() if command in where}
    assert sorted(in_readme) == sorted(in_help)
    for name, text in in_help.items():  # a default --help states is the README's too
        for value in re.findall(r"default ([\w.]+)", text):
            assert re.search(rf"default `?{re.escape(value)}", documented[name][1]), (name, value)


def test_the_readme_exit_codes_are_those_of_help_and_of_exitcodes(capsys: pytest.CaptureFixture[str]) -> None:
    readme = {int(code.strip("`")): meaning for code, meaning in table_rows(section("exit-codes"))}
    constants = {getattr(exitcodes, n) for n in dir(exitcodes) if n.startswith("EXIT_")}
    assert set(readme) == constants == {0, 1, 2, 3, 130}
    for command in ("", "sweep", "check", "apply"):
        text = help_of(command, capsys).split("exit codes:\n", 1)[1]
        in_help = {int(m[0]): m[1] for m in re.findall(r"^  (\d+)\s+(.+)$", text, re.MULTILINE)}
        assert in_help == readme, command


def test_the_readme_output_formats_are_the_choices_of_output(capsys: pytest.CaptureFixture[str]) -> None:
    formats = README.split("**Output formats**", 1)[1].split("\n\n", 2)[1]
    assert [row[0].strip("`") for row in table_rows(formats)] == list(FORMATS)
    assert "{table,json,tsv,csv}" in help_of("sweep", capsys)


def json_keys_documented(document: dict[str, Any]) -> list[str]:
    """The keys of a JSON result (top level and each VM's) that the README's JSON section does not name."""
    text = section("json-shape")
    keys = set(document) | {k for vm in document.get("vms", []) for k in vm}
    return sorted(k for k in keys if f'"{k}"' not in text and f"`{k}`" not in text)


def _rehearsal() -> list[str]:
    block = section("rehearsal").split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _readme_number(pattern: str) -> str:
    match = re.search(pattern, README.split("## Rehearsal on the simulator", 1)[1])
    assert match is not None, pattern
    return match.group(1)


@pytest.mark.slow
def test_the_rehearsal_runs_as_written(tmp_path: Path) -> None:
    commands = _rehearsal()
    assert [c.split()[:2] for c in commands] == [
        ["avma-remediator", "sweep"],
        ["python3", "-m"],
        ["avma-remediator", "apply"],
        ["avma-remediator", "sweep"],
    ]
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = str(ROOT)
    done: list[subprocess.CompletedProcess[str]] = []
    for line in commands:
        argv = shlex.split(line)
        program = [sys.executable, "-m", "shared"] if argv[0] == "avma-remediator" else [sys.executable]
        done.append(
            subprocess.run(
                [*program, *argv[1:]],
                cwd=tmp_path,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=300,
            )
        )
    audit, review, apply, resume = done

    # 1. The audit: exit 1 (two VMs cannot be detected), the summary the README quotes, the plan.
    assert audit.returncode == 1, audit.stderr
    quoted_audit = _readme_number(r"ends `(\d+ VMs, mode audit: [^`]+)`").replace("\n   ", " ")
    assert quoted_audit in audit.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    counts = re.findall(r"`(rekey|repair|none)` (\d+)", README.split("## Rehearsal on the simulator", 1)[1])
    assert plan["counts"] == {action: int(n) for action, n in counts[:3]}
    # 2. The review prints the plan.
    assert review.returncode == 0 and json.loads(review.stdout) == plan
    # 3. The apply: only the plan's VMs with an action; the summary the README quotes.
    actionable = sorted(v["id"] for v in plan["vms"] if v["action"] != "none")
    assert int(_readme_number(r"acts on those (\d+) VMs only")) == len(actionable)
    assert apply.returncode == 1, apply.stderr
    quoted_apply = _readme_number(r"It ends `(\d+ VMs, mode enforce: [^`]+)`").replace("\n   ", " ")
    assert quoted_apply in apply.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    assert sorted(v["id"] for v in result["vms"]) == actionable
    assert json_keys_documented(result) == []
    # 4. The resume: just the failed and deferred VMs of the result.
    again = [v for v in result["vms"] if v["outcome"] in ("failed", "deferred")]
    assert int(_readme_number(r"re-runs just the (\d+) VMs")) == len(again)
    assert resume.returncode == 1, resume.stderr
    assert re.search(rf"^{len(again)} VMs, mode enforce: ", resume.stdout, re.MULTILINE), resume.stdout
    for vm in again:
        assert vm["id"].rsplit("/", 1)[1] in resume.stdout
