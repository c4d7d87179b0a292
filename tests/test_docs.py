"""docs/troubleshooting.md explains every reason the engine can give."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "troubleshooting.md").read_text()
README = (ROOT / "README.md").read_text()

REASONS = [
    # healthy / remediated / would-remediate
    "kms-client-licensed", "retail-licensed", "mak-licensed", "oem-licensed",
    "avma-channel", "kms-client-unlicensed", "custom-kms-overridden",
    "avma-licensed-kms-unreachable", "avma-kms-unreachable",
    # skipped
    "not-windows", "opted-out", "not-running", "multi-session", "unknown-edition", "custom-kms",
    "channel-retail", "channel-mak", "channel-oem", "unknown-channel", "no-product-key",
    "channel-mismatch", "avma-before-2012r2", "not-found",
    # deferred
    "agent-not-ready", "vm-starting", "power-state-unknown", "run-command-busy", "throttled",
    "arm-unavailable", "run-command-timeout", "arm-timeout", "kms-unreachable", "lease-held", "lease-lost",
    "ledger-unavailable",
    # failed
    "activation-error:0xC004F074", "key-install-error:0xC004F069", "step-error:", "remediation-error:",
    "activation-not-attempted", "verify-failed:not-kms-client", "verify-failed:license-status-N",
    "detection-error", "powershell-version", "bad-output",
    "attestation-imds-unreachable", "attestation-imds-http:", "attestation-chain-invalid", "attestation-not-reported", "run-command-failed", "forbidden",
    # the Functions app
    "recently-verified", "deadline-exceeded:", "poison", "malformed-message", "out-of-scope", "scope-unknown",
    # the CLI's plans and signals
    "plan-changed", "interrupted",
]  # fmt: skip


def test_every_reason_is_documented() -> None:
    missing = [r for r in REASONS if f"`{r}" not in DOC]
    assert missing == []


def test_every_reason_in_the_code_is_in_the_list() -> None:
    """Reason words written as literals in the engine must be among those documented above."""
    found: set[str] = set()
    for name in [
        "decide.py",
        "verify.py",
        "workflow.py",
        "azure/compute.py",
        "worker.py",
        "triggers.py",
        "cli.py",
        "plan.py",
        "interrupt.py",
    ]:
        tree = ast.parse((ROOT / "shared" / name).read_text())
        for node in ast.walk(tree):
            is_reason = isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "reason" for t in node.targets
            )
            if is_reason and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                found.add(node.value.value)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "final",
                "_outcome",
                "Outcome",
                "record_event",
            ):
                for arg in node.args:
                    if (
                        isinstance(arg, ast.Constant)
                        and isinstance(arg.value, str)
                        and re.fullmatch(r"[a-z-]+", arg.value)
                    ):
                        found.add(arg.value)
    found.discard("arm-error")  # base class default, never raised
    found.discard("unparsable-message")  # a ledger target (record_event's first argument), not a reason
    undocumented = sorted(r for r in found if not any(r == x or x.startswith(r) for x in REASONS))
    assert undocumented == []
    assert len(found) >= 15  # the scan really saw the reasons


SETTINGS_READ = re.compile(r'get\("([A-Za-z_]+)"')


def test_every_setting_the_code_reads_is_documented_and_in_the_local_example() -> None:
    import json

    read = set(SETTINGS_READ.findall((ROOT / "shared" / "settings.py").read_text())) | {"AZURE_CLIENT_ID"}
    read |= set(re.findall(r"%([A-Z_]+)%", (ROOT / "function_app.py").read_text()))
    assert len(read) >= 25
    readme = (ROOT / "README.md").read_text()
    example = json.loads((ROOT / "local.settings.json.example").read_text())["Values"]
    assert sorted(n for n in read if f"`{n}" not in readme and n not in readme) == []
    assert sorted(n for n in read if n not in example and not n.startswith("AzureWebJobsStorage__")) == []


def test_the_readme_s_opt_out_row_says_exactly_the_rule_the_gate_applies() -> None:
    """README, Settings, OPT_OUT_TAG: the values that keep a VM in scope are those the row names
    between "except" and the colon, in any case and with spaces around them; anything else opts
    out, an empty value too; the tag name matches in any case."""
    from shared.decide import is_opted_out
    from shared.model import VmId
    from shared.vm import VmFacts

    vm_id = VmId.parse(
        "/subscriptions/11111111-2222-4333-8444-555555555555/resourceGroups/rg"
        "/providers/Microsoft.Compute/virtualMachines/vm"
    )

    (row,) = [line for line in README.splitlines() if line.startswith("| `OPT_OUT_TAG` |")]
    meaning = row.split(" | ")[2]
    kept = re.findall(r"`([^`]+)`", meaning[meaning.index("except") : meaning.index(":")])
    assert kept == ["false", "no", "0"]
    assert "in any case and with spaces around the value ignored" in meaning
    assert "an empty one too" in meaning and "its name in any case" in meaning

    def opted(name: str, value: str) -> bool:
        facts = VmFacts(vm_id, "Windows", "running", True, tags={name: value})
        return is_opted_out(facts, "avma-remediator-opt-out")

    for value in kept:
        for written in (value, value.upper(), f" {value} ", f"\t{value.title()}  "):
            assert not opted("avma-remediator-opt-out", written), repr(written)
    for value in ("", " ", "true", "yes", "1", "off", "n", "no!", "0.0"):
        assert opted("avma-remediator-opt-out", value), repr(value)
    assert opted("AVMA-Remediator-Opt-Out", "true")


def test_the_cli_s_own_reasons_are_documented() -> None:
    """The reason words of plans and signals are constants, which the literal scan above cannot see."""
    from shared.interrupt import INTERRUPTED
    from shared.plan import PLAN_CHANGED

    assert [r for r in (PLAN_CHANGED, INTERRUPTED) if f"`{r}`" not in DOC] == []


def test_the_troubleshooting_guide_says_where_a_cli_check_shows() -> None:
    """Its advice is "re-run `check`": that outcome shows in /api/status only when the CLI has the
    storage settings (issue 10, item 8)."""
    assert "shows in `/api/status` when the CLI has the storage settings" in " ".join(DOC.split())


def test_readme_and_security_say_plainly_what_an_audit_runs_in_each_vm() -> None:
    """An audit runs a read-only script as SYSTEM in every running Windows VM in scope, and each run
    shows in the Activity Log: said in the README and in docs/security.md, with the sources."""
    security = " ".join((ROOT / "docs" / "security.md").read_text().split())
    readme = " ".join(README.split())
    for text in (readme, security):
        assert "a read-only" in text and "script as SYSTEM in every running Windows VM in scope" in text
        assert "shows in the Activity Log" in text
        assert "`Microsoft.Compute/virtualMachines/runCommand/action`" in text
        assert "articles/virtual-machines/windows/run-command.md" in text
        assert "includes/resource-manager-audit-limitations.md" in text


def test_the_simulator_guide_says_which_generator_keys_are_required() -> None:
    """docs/simulator.md names the required keys of the generator form, and they are the ones the
    estate loader requires (a recipe without ``seed`` is an error, not a random estate)."""
    import pytest

    from simulator import Estate, EstateError

    doc = " ".join((ROOT / "docs" / "simulator.md").read_text().split())
    match = re.search(r"`(\w+)` and `(\w+)` are required; (.+?) are optional", doc)
    assert match is not None
    required = {match.group(1), match.group(2)}
    assert required == {"count", "seed"}
    for missing in required:
        recipe = {"count": 3, "seed": 1}
        del recipe[missing]
        with pytest.raises(EstateError, match=missing):
            Estate.from_dict({"generate": recipe})
    Estate.from_dict({"generate": {"count": 3, "seed": 1}})  # and nothing else is
