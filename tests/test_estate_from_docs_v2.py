"""An estate written from the docs alone (issue 8), run through the real CLI.

tests/data/estate-from-docs-v2.json was written only from README.md, docs/simulator.md,
docs/troubleshooting.md and docs/guest-contract.md, before anything was run. The tables below are
the outcomes those docs promise for each VM, in audit (`sweep --simulate FILE --output json`) and
in apply (`--apply`), and for `check --computer NAME`. Each row says which doc line it follows.

The negative cases are estates the docs say the loader refuses (`EstateError`, with the JSON
path of the offending value and, for combinations Windows cannot be in, the source).

Where the docs did not let me predict (guesses in the tables below; after the run every one of
them held, and the docs now say so where they were silent):
- which JSON path a combination refusal names (AVMA on a build/edition/workstation: taken as
  `guest.channel`, since the docs say "`channel` at a build below 9600"; psVersion: `guest.psVersion`);
- whether Datacenter: Azure Edition with a failed attestation is `healthy` (docs/simulator.md's built-in
  table, `azure-2022-noattest`) or `failed: attestation-chain-invalid` (troubleshooting row 9): row 9 taken;
- what audit says for an AVMA Azure Edition VM whose attestation will fail after the re-key
  (taken: `would-remediate: avma-channel`, the plan; only the re-read after a remediation checks it);
- both `imdsReachable` and `imdsChainValid` false: taken as imds-unreachable (chainValid is null then);
- whether a product with an empty description but a `productKeyChannel` naming a channel is
  `unknown-channel` or `channel-mismatch` (taken: unknown-channel; the mismatch check guards rows 8-9);
- whether `--computer` matches without case (taken: yes, for the FQDN in lower case);
- the number of Run Commands per remediation (taken: 2, detect then remediate, which re-reads);
- the estate has no key for `productKeyChannel`, so its contradictions cannot be written at all.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.cli import main
from simulator import Estate, EstateError
from tests.estates import settings_a_run_reads

ESTATE = Path(__file__).parent / "data" / "estate-from-docs-v2.json"

# name -> (audit outcome, audit reason, apply outcome, apply reason)
# T = docs/troubleshooting.md ("The decision order", row N), S = docs/simulator.md, G = guest-contract.md
EXPECTED: dict[str, tuple[str, str, str, str]] = {
    # T8: AVMA, catalog key for 2012 R2 Datacenter (sku 8), KMS reachable -> re-key. psVersion default 4.0 (S).
    "avma-2012r2-dc-ps4": ("would-remediate", "avma-channel", "remediated", "avma-channel"),
    # T8: reachable -> re-key whatever the license status (Licensed too). psVersion 5.1 allowed on 9600 (S).
    "avma-2012r2-std-ps51": ("would-remediate", "avma-channel", "remediated", "avma-channel"),
    # T8: still Licensed, KMS unreachable -> not re-keyed; audit shows the conditional plan.
    "avma-2019-dc-lic-nokms": (
        "would-remediate",
        "avma-licensed-kms-unreachable",
        "deferred",
        "kms-unreachable",
    ),
    # T8: not Licensed, KMS unreachable -> re-keyed, activation 0xC004F074 (S guest model: activate).
    "avma-2022-std-unlic-nokms": (
        "would-remediate",
        "avma-kms-unreachable",
        "failed",
        "activation-error:0xC004F074",
    ),
    # S productName null -> name "" ; G: the channel comes from description, so nothing changes.
    "avma-2016-dc-noname": ("would-remediate", "avma-channel", "remediated", "avma-channel"),
    # S productDescription null -> "" "so the engine cannot tell the channel"; G: anything else -> UNKNOWN; T11.
    "avma-2016-std-nodesc": ("skipped", "unknown-channel", "skipped", "unknown-channel"),
    # Same for a KMS client that a repair would help: the channel is UNKNOWN, never touched (G, T11).
    "kms-2019-std-nodesc-unlic": ("skipped", "unknown-channel", "skipped", "unknown-channel"),
    # T8: no catalog row for the exact build/EditionID/SKU (sku 4294967295) -> unknown-edition.
    "avma-2019-dc-sku-max": ("skipped", "unknown-edition", "skipped", "unknown-edition"),
    # T9: licensed KMS client -> healthy, the SKU plays no part.
    "kms-2022-dc-sku0": ("healthy", "kms-client-licensed", "healthy", "kms-client-licensed"),
    # T9: unlicensed KMS client, no host -> repair, no key (so no catalog row needed).
    "kms-2022-std-skumax-unlic": (
        "would-remediate",
        "kms-client-unlicensed",
        "remediated",
        "kms-client-unlicensed",
    ),
    # S: an EditionID no table knows is accepted by the loader; T8: the catalog never guesses.
    "avma-2025-next-edition": ("skipped", "unknown-edition", "skipped", "unknown-edition"),
    # T2: tag name compared without case, value trimmed, "false" -> not opted out.
    "avma-2016-std-optout-false": ("would-remediate", "avma-channel", "remediated", "avma-channel"),
    # T9: Azure Edition licensed KMS client, attestation passed -> healthy.
    "azure-2022-kms-ok": ("healthy", "kms-client-licensed", "healthy", "kms-client-licensed"),
    # T9: Azure Edition, IMDS not reached.
    "azure-2022-kms-noimds": (
        "failed",
        "attestation-imds-unreachable",
        "failed",
        "attestation-imds-unreachable",
    ),
    # T9: Azure Edition, chain does not build (S's built-in table says `azure-2022-noattest` is
    # healthy: contradicts T9; T9 is followed here).
    "azure-2022-kms-badchain": (
        "failed",
        "attestation-chain-invalid",
        "failed",
        "attestation-chain-invalid",
    ),
    # T8 + T "After a remediation": re-keyed, re-read attestation passes.
    "azure-2025-avma-ok": ("would-remediate", "avma-channel", "remediated", "avma-channel"),
    # Audit: the plan is the re-key (T8); apply: re-read attestation fails -> attestation reason.
    "azure-2022-avma-badchain": ("would-remediate", "avma-channel", "failed", "attestation-chain-invalid"),
    # T9: unlicensed KMS client -> repair; after it the attestation (IMDS unreachable; S: chainValid
    # null when IMDS is not reached, so imds-unreachable wins) -> attestation reason.
    "azure-2025-kms-unlic-noimds": (
        "would-remediate",
        "kms-client-unlicensed",
        "failed",
        "attestation-imds-unreachable",
    ),
    # T3: every power state.
    "pw-starting": ("deferred", "vm-starting", "deferred", "vm-starting"),
    "pw-stopping": ("skipped", "not-running", "skipped", "not-running"),
    "pw-stopped": ("skipped", "not-running", "skipped", "not-running"),
    "pw-deallocating": ("skipped", "not-running", "skipped", "not-running"),
    "pw-deallocated": ("skipped", "not-running", "skipped", "not-running"),
    "pw-unknown": ("deferred", "power-state-unknown", "deferred", "power-state-unknown"),
    # T4.
    "pw-running-noagent": ("deferred", "agent-not-ready", "deferred", "agent-not-ready"),
    # T2: opt-out "whatever the VM's state" (before T3).
    "pw-stopped-optout": ("skipped", "opted-out", "skipped", "opted-out"),
    # Attached OS disk, computerName differs: the sweep finds it like any VM (T8 re-key).
    "mig-legacy-app-vm01": ("would-remediate", "avma-channel", "remediated", "avma-channel"),
    "mig-legacy-db-vm02": ("skipped", "not-running", "skipped", "not-running"),
    # S psVersion default for 2008 (NT 6.0) is 1.0; T5: older than 3.0 -> failed: powershell-version.
    "legacy-2008-std": ("failed", "powershell-version", "failed", "powershell-version"),
    "legacy-2008sp2-ps2": ("failed", "powershell-version", "failed", "powershell-version"),
    # S: 2008 SP2 may have 3.0 -> scripts run; T9: unlicensed KMS client, no host -> repair.
    "legacy-2008sp2-ps3": (
        "would-remediate",
        "kms-client-unlicensed",
        "remediated",
        "kms-client-unlicensed",
    ),
    # S: 2008 R2 RTM default 2.0 -> T5.
    "legacy-2008r2-rtm": ("failed", "powershell-version", "failed", "powershell-version"),
    # S: 2008 R2 SP1 with 4.0; T9: host kms.core.windows.net is an Azure KMS name -> repair.
    "legacy-2008r2-sp1-ps4": (
        "would-remediate",
        "kms-client-unlicensed",
        "remediated",
        "kms-client-unlicensed",
    ),
    # S: 2012 default 3.0; T9: OOB grace (2) is "not licensed" -> repair.
    "legacy-2012-std-oob": (
        "would-remediate",
        "kms-client-unlicensed",
        "remediated",
        "kms-client-unlicensed",
    ),
    # S: Windows 10 1507 default 5.0; T9.
    "win10-1507-ent": ("healthy", "kms-client-licensed", "healthy", "kms-client-licensed"),
    # T6.
    "avd-ms-2023": ("skipped", "multi-session", "skipped", "multi-session"),
    # T1.
    "lnx-01": ("skipped", "not-windows", "skipped", "not-windows"),
}

# Where a remediation ran (README: `steps` as [name, HRESULT]; G: the steps and their order).
OK = "0x00000000"
REKEY_STEPS = [
    ["install-key", OK],
    ["clear-kms-cache", OK],
    ["set-kms-host", OK],
    ["set-kms-port", OK],
    ["refresh", OK],
    ["activate", OK],
]
REPAIR_STEPS = REKEY_STEPS[1:]
STEPS: dict[str, list[list[str]]] = {
    "avma-2012r2-dc-ps4": REKEY_STEPS,
    "avma-2012r2-std-ps51": REKEY_STEPS,
    "avma-2022-std-unlic-nokms": [*REKEY_STEPS[:-1], ["activate", "0xC004F074"]],
    "avma-2016-dc-noname": REKEY_STEPS,
    "kms-2022-std-skumax-unlic": REPAIR_STEPS,
    "avma-2016-std-optout-false": REKEY_STEPS,
    "azure-2025-avma-ok": REKEY_STEPS,
    "azure-2022-avma-badchain": REKEY_STEPS,
    "azure-2025-kms-unlic-noimds": REPAIR_STEPS,
    "mig-legacy-app-vm01": REKEY_STEPS,
    "legacy-2008sp2-ps3": REPAIR_STEPS,
    "legacy-2008r2-sp1-ps4": REPAIR_STEPS,
    "legacy-2012-std-oob": REPAIR_STEPS,
}

# VMs that never get a Run Command: ARM facts decide (T1-T4).
ARM_DECIDED = {
    "lnx-01",
    "pw-starting",
    "pw-stopping",
    "pw-stopped",
    "pw-deallocating",
    "pw-deallocated",
    "pw-unknown",
    "pw-running-noagent",
    "pw-stopped-optout",
    "mig-legacy-db-vm02",
}

# State after --apply (S "The state dump"): (channel, licenseStatus) of the VMs whose state changed.
APPLY_STATE_CHANGED: dict[str, tuple[str, int]] = {
    **dict.fromkeys(STEPS, ("KMS_CLIENT", 1)),
    # S guest model: install-key -> status 5; activate 0xC004F074 leaves it there.
    "avma-2022-std-unlic-nokms": ("KMS_CLIENT", 5),
}


# The re-keyed VMs whose first Run Command found the facts ARM's OS name promised (not the one
# whose KMS is unreachable: its conditional re-key changes nothing, then Python decides to re-key).
ONE_RUN_COMMAND = {
    name for name, steps in STEPS.items() if steps == REKEY_STEPS and name != "avma-2022-std-unlic-nokms"
}


def _name(vm_id: str) -> str:
    return vm_id.rsplit("/", 1)[-1]


@pytest.fixture(scope="module", autouse=True)
def _clean_environment() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for setting in settings_a_run_reads():
            patch.delenv(setting, raising=False)
        yield


def _run(*args: str) -> tuple[int, dict[str, Any], str]:
    """The real CLI in-process (`avma-remediator` is `shared.cli:main`), with a fast simulator."""
    if "--simulate" in args:
        args = (*args, "--sim-latency", "0.02")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    assert isinstance(code, int)
    try:
        report = json.loads(out.getvalue())
    except ValueError:
        report = {}
    return code, report, err.getvalue()


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], dict[str, Any]]:
    state = tmp_path_factory.mktemp("audit") / "state.json"
    code, out, err = _run(
        "sweep", "--simulate", str(ESTATE), "--output", "json", "--sim-state-out", str(state)
    )
    assert out, err
    return code, out, json.loads(state.read_text())


@pytest.fixture(scope="module")
def apply(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], dict[str, Any]]:
    state = tmp_path_factory.mktemp("apply") / "state.json"
    code, out, err = _run(
        "sweep", "--simulate", str(ESTATE), "--apply", "--output", "json", "--sim-state-out", str(state)
    )
    assert out, err
    return code, out, json.loads(state.read_text())


def _by_name(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {_name(vm["id"]): vm for vm in out["vms"]}


def test_estate_covers_what_the_brief_asks() -> None:
    data = json.loads(ESTATE.read_text())
    names = [_name(vm["id"]) for vm in data["vms"]]
    assert sorted(names) == sorted(EXPECTED)
    states = {vm["powerState"] for vm in data["vms"]}
    assert states == {"starting", "running", "stopping", "stopped", "deallocating", "deallocated", "unknown"}
    ps = {vm["guest"].get("psVersion") for vm in data["vms"] if "guest" in vm}
    assert {"2.0", "3.0", "4.0", "5.1"} <= ps
    assert any(vm.get("createOption") == "Attach" for vm in data["vms"])
    Estate.load(str(ESTATE))  # the loader accepts it


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_audit_outcome(name: str, audit: tuple[int, dict[str, Any], dict[str, Any]]) -> None:
    _, out, _ = audit
    vm = _by_name(out)[name]
    assert (vm["outcome"], vm["reason"]) == EXPECTED[name][:2]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_apply_outcome(name: str, apply: tuple[int, dict[str, Any], dict[str, Any]]) -> None:
    _, out, _ = apply
    vm = _by_name(out)[name]
    assert (vm["outcome"], vm["reason"]) == EXPECTED[name][2:]


def test_audit_summary_exit_code_and_nothing_changed(
    audit: tuple[int, dict[str, Any], dict[str, Any]],
) -> None:
    code, out, state = audit
    assert out["summary"] == dict(Counter(e[0] for e in EXPECTED.values()))
    assert code == 1  # README: 1 when some VM failed (powershell-version, attestation)
    assert len(out["vms"]) == len(EXPECTED)
    for vm_id, entry in state.items():
        name = _name(vm_id)
        assert entry["changed"] is False, name  # README: audit mode changes nothing
        assert entry["runCommands"] == (0 if name in ARM_DECIDED else 1), name


def test_apply_summary_exit_code_and_state(apply: tuple[int, dict[str, Any], dict[str, Any]]) -> None:
    code, out, state = apply
    assert out["summary"] == dict(Counter(e[2] for e in EXPECTED.values()))
    assert code == 1
    for vm_id, entry in state.items():
        name = _name(vm_id)
        if name in APPLY_STATE_CHANGED:
            assert entry["changed"] is True, name
            assert (entry["channel"], entry["licenseStatus"]) == APPLY_STATE_CHANGED[name], name
            # Issue 12: an AVMA VM whose edition ARM names, and whose facts match, is re-keyed by
            # its first Run Command; any other change is detect, then remediate (which re-reads).
            assert entry["runCommands"] == (1 if name in ONE_RUN_COMMAND else 2), name
        else:
            assert entry["changed"] is False, name
            assert entry["runCommands"] == (0 if name in ARM_DECIDED else 1), name


def test_apply_steps_and_after_facts(apply: tuple[int, dict[str, Any], dict[str, Any]]) -> None:
    _, out, _ = apply
    vms = _by_name(out)
    for name, steps in STEPS.items():
        assert vms[name]["steps"] == steps, name
        channel, status = APPLY_STATE_CHANGED[name]
        assert vms[name]["channelAfter"] == channel, name
        assert vms[name]["licenseStatusAfter"] == status, name


def test_conditional_plans_and_failures_carry_a_hint(
    audit: tuple[int, dict[str, Any], dict[str, Any]],
    apply: tuple[int, dict[str, Any], dict[str, Any]],
) -> None:
    for _, out, _ in (audit, apply):
        for vm in out["vms"]:
            if vm["outcome"] == "failed" or vm["reason"].startswith(("avma-licensed-kms", "avma-kms")):
                assert vm.get("hint"), vm
    # README: kmsReachable is among the facts that led there.
    vms = _by_name(audit[1])
    assert vms["avma-2019-dc-lic-nokms"]["kmsReachable"] is False
    assert vms["avma-2012r2-dc-ps4"]["kmsReachable"] is True


# check --computer (README: guest-reported name, osProfile name or VM name; an FQDN matches on
# its first label; none is `skipped: not-found`).
CHECKS = [
    ("LEGACYAPP01", [], {"mig-legacy-app-vm01": ("would-remediate", "avma-channel")}),
    ("legacyapp01.corp.contoso.com", [], {"mig-legacy-app-vm01": ("would-remediate", "avma-channel")}),
    ("mig-legacy-app-vm01", [], {"mig-legacy-app-vm01": ("would-remediate", "avma-channel")}),
    ("LEGACYAPP01", ["--apply"], {"mig-legacy-app-vm01": ("remediated", "avma-channel")}),
    ("LEGACYDB02", [], {"mig-legacy-db-vm02": ("skipped", "not-running")}),
    # S computerName default: the VM name cut to 15 characters.
    ("avma-2016-dc-no", [], {"avma-2016-dc-noname": ("would-remediate", "avma-channel")}),
]


@pytest.mark.parametrize(("computer", "extra", "expected"), CHECKS)
def test_check_by_computer(computer: str, extra: list[str], expected: dict[str, tuple[str, str]]) -> None:
    code, out, err = _run(
        "check", "--simulate", str(ESTATE), "--computer", computer, "--output", "json", *extra
    )
    assert out, err
    assert {_name(vm["id"]): (vm["outcome"], vm["reason"]) for vm in out["vms"]} == expected
    assert code == 0


def test_builtin_azure_edition_watermark_vm_fails_as_the_simulator_docs_now_say() -> None:
    """docs/simulator.md's built-in table said `azure-2022-noattest` ends healthy; troubleshooting
    row 9 (and the engine) say `failed: attestation-chain-invalid`. The table was fixed."""
    vm_id = next(vm.id for vm in Estate.default().vms if vm.id.endswith("/azure-2022-noattest"))
    code, out, err = _run("check", "--simulate", "--output", "json", vm_id)
    assert out, err
    assert [(vm["outcome"], vm["reason"]) for vm in out["vms"]] == [("failed", "attestation-chain-invalid")]
    assert code == 1


def test_check_by_unknown_computer_is_not_found() -> None:
    code, out, err = _run("check", "--simulate", str(ESTATE), "--computer", "NOSUCHHOST", "--output", "json")
    assert out, err
    assert [(vm["outcome"], vm["reason"]) for vm in out["vms"]] == [("skipped", "not-found")]
    assert code == 1  # README: a VM you named that does not exist is exit 1 (issue 10, item 4)
    assert "has the computer name 'NOSUCHHOST'" in err


# ---- the loader's negative cases (S "What the estate refuses", the key tables) ----

SUB = "3f2c8a51-6b0e-4d7a-9c1e-2a5b7d9e4f10"
BASE_VM: dict[str, Any] = {
    "id": f"/subscriptions/{SUB}/resourceGroups/rg-neg/providers/Microsoft.Compute/virtualMachines/neg-01",
    "os": "Windows",
    "powerState": "running",
    "agentReady": True,
    "tags": {},
    "guest": {
        "caption": "Microsoft Windows Server 2019 Datacenter",
        "build": 17763,
        "productType": 3,
        "editionId": "ServerDatacenter",
        "sku": 8,
        "channel": "AVMA",
        "licenseStatus": 5,
        "kmsHost": None,
        "kmsReachable": True,
    },
}
AVMA_SRC = "automatic-vm-activation.md"
WMF_SRC = "wmf-overview.md"


def _guest(**changes: Any) -> dict[str, Any]:
    vm = copy.deepcopy(BASE_VM)
    vm["guest"].update(changes)
    return vm


def _vm(**changes: Any) -> dict[str, Any]:
    vm = copy.deepcopy(BASE_VM)
    vm.update(changes)
    return vm


KMS = {"channel": "KMS_CLIENT"}
# (case, vm, expected path, text the message must contain or None)
NEGATIVE: list[tuple[str, dict[str, Any], str, str | None]] = [
    (
        "avma-2012",
        _guest(caption="Microsoft Windows Server 2012 Datacenter", build=9200),
        "$.vms[0].guest.channel",
        AVMA_SRC,
    ),
    (
        "avma-2008r2",
        _guest(caption="Microsoft Windows Server 2008 R2 Datacenter ", build=7601),
        "$.vms[0].guest.channel",
        AVMA_SRC,
    ),
    (
        "avma-workstation",
        _guest(
            caption="Microsoft Windows 10 Enterprise",
            build=19045,
            productType=1,
            editionId="Enterprise",
            sku=4,
        ),
        "$.vms[0].guest.channel",
        AVMA_SRC,
    ),
    (
        "avma-multisession",
        _guest(
            caption="Microsoft Windows 11 Enterprise multi-session",
            build=22631,
            editionId="ServerRdsh",
            sku=175,
        ),
        "$.vms[0].guest.channel",
        AVMA_SRC,
    ),
    (
        "avma-essentials-2022",
        _guest(
            caption="Microsoft Windows Server 2022 Essentials",
            build=20348,
            editionId="ServerSolution",
            sku=50,
        ),
        "$.vms[0].guest.channel",
        AVMA_SRC,
    ),
    (
        "avma-eval",
        _guest(editionId="ServerDatacenterEval", sku=80),
        "$.vms[0].guest.channel",
        AVMA_SRC,
    ),
    (
        "ps30-on-2008r2-rtm",
        _guest(caption="Microsoft Windows Server 2008 R2 Datacenter ", build=7600, psVersion="3.0", **KMS),
        "$.vms[0].guest.psVersion",
        WMF_SRC,
    ),
    ("ps50-on-2016", _guest(build=14393, psVersion="5.0"), "$.vms[0].guest.psVersion", WMF_SRC),
    (
        "ps51-on-win10-1507",
        _guest(build=10240, productType=1, editionId="Enterprise", sku=4, psVersion="5.1", **KMS),
        "$.vms[0].guest.psVersion",
        WMF_SRC,
    ),
    (
        "ps30-on-2008-rtm",
        _guest(caption="Microsoft Windows Server 2008 Standard", build=6001, psVersion="3.0", **KMS),
        "$.vms[0].guest.psVersion",
        WMF_SRC,
    ),
    (
        "ps40-on-win8",
        _guest(build=9200, productType=1, editionId="Enterprise", sku=4, psVersion="4.0", **KMS),
        "$.vms[0].guest.psVersion",
        WMF_SRC,
    ),
    ("ps72", _guest(psVersion="7.2"), "$.vms[0].guest.psVersion", None),
    ("ps-number", _guest(psVersion=5.1), "$.vms[0].guest.psVersion", None),
    ("imds-not-azure-edition", _guest(imdsReachable=False), "$.vms[0].guest.imdsReachable", None),
    ("chain-not-azure-edition", _guest(imdsChainValid=True), "$.vms[0].guest.imdsChainValid", None),
    (
        "productKeyChannel-unknown-key",
        _guest(productKeyChannel="Retail"),
        "$.vms[0].guest.productKeyChannel",
        None,
    ),
    ("sku-too-big", _guest(sku=4294967296), "$.vms[0].guest.sku", None),
    ("sku-negative", _guest(sku=-1), "$.vms[0].guest.sku", None),
    ("productName-string", _guest(productName="Windows"), "$.vms[0].guest.productName", None),
    ("productDescription-empty", _guest(productDescription=""), "$.vms[0].guest.productDescription", None),
    ("computerName-underscore", _vm(computerName="LEGACY_APP01"), "$.vms[0].computerName", None),
    ("computerName-digits", _vm(computerName="1234567"), "$.vms[0].computerName", None),
    ("computerName-16", _vm(computerName="ABCDEFGHIJKLMNOP"), "$.vms[0].computerName", None),
    ("createOption-empty", _vm(createOption="Empty"), "$.vms[0].createOption", None),
    ("powerState-hibernated", _vm(powerState="hibernated"), "$.vms[0].powerState", None),
    ("guest-on-linux", _vm(os="Linux"), "$.vms[0].guest", None),
]


@pytest.mark.parametrize(("case", "vm", "path", "text"), NEGATIVE, ids=[n[0] for n in NEGATIVE])
def test_loader_refuses(case: str, vm: dict[str, Any], path: str, text: str | None) -> None:
    with pytest.raises(EstateError) as info:
        Estate.from_dict({"vms": [vm]})
    assert info.value.path == path
    if text is not None:
        assert text in str(info.value)


def test_base_of_negative_cases_is_accepted() -> None:
    Estate.from_dict({"vms": [copy.deepcopy(BASE_VM)]})


@pytest.mark.parametrize("case", ["avma-2012", "ps30-on-2008r2-rtm"])
def test_cli_reports_a_refused_estate(case: str, tmp_path: Path) -> None:
    vm, path = next((n[1], n[2]) for n in NEGATIVE if n[0] == case)
    estate = tmp_path / "bad.json"
    estate.write_text(json.dumps({"vms": [vm]}))
    code, _, err = _run("sweep", "--simulate", str(estate), "--output", "json")
    assert code == 2  # README: usage or configuration error
    assert path in err
