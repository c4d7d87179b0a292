"""End-to-end check of a hand-written estate against outcomes predicted from the docs alone.

The estate (tests/data/estate-from-docs.json) and every expectation below were written from
README.md, docs/simulator.md and docs/troubleshooting.md only, without reading the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.cli import main
from tests.estates import settings_a_run_reads

ESTATE_PATH = Path(__file__).resolve().parent / "data" / "estate-from-docs.json"

AZURE_KMS = "azkms.core.windows.net:1688"  # README: KMS_HOST/KMS_PORT default for AzureCloud

AVMA = ("remediated", "avma-channel")
KMS_REPAIR = ("remediated", "kms-client-unlicensed")
NO_KMS = ("failed", "activation-error:0xC004F074")
NOT_RUNNING = ("skipped", "not-running")
OPTED_OUT = ("skipped", "opted-out")
KMS_OK = ("healthy", "kms-client-licensed")

# VM name -> (outcome, reason) with --apply, from docs/troubleshooting.md.
EXPECTED_APPLY: dict[str, tuple[str, str]] = {
    # AVMA, running, agent ready, Azure KMS reachable, edition in Microsoft's GVLK table.
    "avma-2012r2-dc": AVMA,
    "avma-2012r2-ess": AVMA,  # Essentials (ServerSolution, sku 50), OOB grace
    "avma-2016-std-core": AVMA,  # Server Core (sku 13) takes its edition's key
    "avma-2019-dc-core": AVMA,  # Server Core (sku 12)
    "avma-2019-std-dc": AVMA,  # domain controller (productType 2): catalog is build/EditionID/SKU
    "avma-2022-dc": AVMA,
    "avma-2022-azure": AVMA,  # Datacenter: Azure Edition (ServerTurbine, sku 407)
    "avma-2025-std": AVMA,
    "avma-2019-std-optout-false": AVMA,  # opt-out tag with value "false" does not opt out
    # AVMA, Azure KMS unreachable: key installed, activation fails.
    "avma-2022-std-nokms": NO_KMS,
    "avma-2016-dc-nokms": NO_KMS,
    # Not running.
    "avma-2019-std-dealloc": NOT_RUNNING,
    "avma-2022-dc-stopped": NOT_RUNNING,
    # Agent not ready.
    "avma-2019-dc-noagent": ("deferred", "agent-not-ready"),
    # Opt-out tag, any value but false/no/0.
    "avma-2022-std-optout": OPTED_OUT,
    "avma-2016-dc-optout-yes": OPTED_OUT,
    # Linux.
    "lnx-web-01": ("skipped", "not-windows"),
    # Multi-session (a KMS client: AVMA is for Windows Server guests only): never re-keyed.
    "avd-ms-01": ("skipped", "multi-session"),
    # AVMA, but OperatingSystemSKU reads PRODUCT_UNLICENSED: no catalog row matches every fact.
    "avma-2016-std-sku-unlicensed": ("skipped", "unknown-edition"),
    # A foreign Run Command that lasts an hour: every attempt gets 409 Conflict.
    "avma-2019-dc-busy": ("deferred", "run-command-busy"),
    # KMS clients.
    "kms-2019-dc-01": KMS_OK,
    "kms-2022-dc-nohost-lic": KMS_OK,  # "whichever KMS it uses"
    "kms-2022-std-contoso-ok": KMS_OK,
    "win10-ent-01": KMS_OK,
    "kms-2019-std-unlic-nohost": KMS_REPAIR,
    "kms-2022-dc-unlic-azhost": KMS_REPAIR,
    "kms-2008r2-dc-unlic": KMS_REPAIR,
    "win11-ent-unlic": KMS_REPAIR,
    "kms-2019-dc-contoso": ("skipped", "custom-kms"),  # ALLOW_CUSTOM_KMS_OVERRIDE=false
    # Retail / MAK / OEM: never touched.
    "retail-2022-std-lic": ("healthy", "retail-licensed"),
    "retail-2016-std-unlic": ("skipped", "channel-retail"),
    "mak-2016-dc-lic": ("healthy", "mak-licensed"),
    "mak-2019-dc-unlic": ("skipped", "channel-mak"),
    "oem-2012r2-std-lic": ("healthy", "oem-licensed"),
    "oem-2019-std-unlic": ("skipped", "channel-oem"),
}

# Last five characters of the KMS client setup key (kms-client-activation-keys.md) that the
# AVMA VMs must end up with.
GVLK_TAIL = {
    "avma-2012r2-dc": "Q3VJ9",  # W3GGN-FT8W3-Y4M27-J84CP-Q3VJ9
    "avma-2012r2-ess": "M4FWM",  # KNC87-3J2TX-XB4WP-VCPJV-M4FWM
    "avma-2016-std-core": "KHKQY",  # WC2BQ-8NRM3-FDDYY-2BFGV-KHKQY
    "avma-2016-dc-nokms": "8XDDG",  # CB7KF-BWN84-R7R2Y-793K2-8XDDG
    "avma-2019-dc-core": "63DFG",  # WMDGN-G9PQG-XVVXX-R3X43-63DFG
    "avma-2019-std-dc": "J464C",  # N69G4-B89J2-4G8F4-WWYCC-J464C
    "avma-2019-std-optout-false": "J464C",
    "avma-2022-dc": "6VM33",  # WX4NM-KYWYW-QJJR4-XV3QB-6VM33
    "avma-2022-azure": "KHMXV",  # NTBV8-9K7Q8-V27C6-M2BTV-KHMXV
    "avma-2022-std-nokms": "VMK7H",  # VDYBN-27WPP-V4HQT-9VMD4-VMK7H
    "avma-2025-std": "MY832",  # TVRH6-WHNXV-R9WG3-9XRFY-MY832
}


def _audit(expected: tuple[str, str]) -> tuple[str, str]:
    """Audit mode: whatever --apply would try to remediate becomes would-remediate, same reason.

    The unreachable-KMS VMs (not licensed) are decided for remediation too (the failure happens
    only when activating), so in audit they are would-remediate avma-kms-unreachable, the plan
    with its route hint (docs/troubleshooting.md, row 8).
    """
    if expected in (AVMA, KMS_REPAIR):
        return ("would-remediate", expected[1])
    if expected == NO_KMS:
        return ("would-remediate", "avma-kms-unreachable")
    return expected


EXPECTED_AUDIT = {name: _audit(expected) for name, expected in EXPECTED_APPLY.items()}


def _name(vm_id: str) -> str:
    return vm_id.rstrip("/").rsplit("/", 1)[-1]


def _load_estate() -> dict[str, dict[str, Any]]:
    data = json.loads(ESTATE_PATH.read_text(encoding="utf-8"))
    return {_name(vm["id"]): vm for vm in data["vms"]}


def _run(argv: list[str]) -> int:
    try:
        rc = main(argv)
    except SystemExit as exc:  # the README does not say whether main returns or exits
        rc = exc.code
    assert isinstance(rc, int)
    return rc


def test_estate_matches_expectations() -> None:
    estate = _load_estate()
    assert 25 <= len(estate) <= 35
    assert set(estate) == set(EXPECTED_APPLY)
    assert len({vm["id"].split("/")[2] for vm in estate.values()}) == 2


@pytest.mark.parametrize("mode", ["apply", "audit"])
def test_outcomes_match_docs(
    mode: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for setting in settings_a_run_reads():
        monkeypatch.delenv(setting, raising=False)
    estate = _load_estate()
    expected = EXPECTED_APPLY if mode == "apply" else EXPECTED_AUDIT
    state_out = tmp_path / "state.json"

    argv = ["sweep", "--simulate", str(ESTATE_PATH), "--output", "json"]
    argv += ["--sim-state-out", str(state_out)]
    if mode == "apply":
        argv.append("--apply")
    rc = _run(argv)
    out = capsys.readouterr().out
    report = json.loads(out)

    # Every VM exactly once, with the predicted outcome and reason.
    actual: dict[str, tuple[str, str]] = {}
    for vm in report["vms"]:
        name = _name(vm["id"])
        assert name not in actual, f"{name} reported twice"
        actual[name] = (vm["outcome"], vm["reason"])
    mismatches = {
        name: {"expected": expected.get(name), "actual": actual.get(name)}
        for name in sorted(set(expected) | set(actual))
        if expected.get(name) != actual.get(name)
    }
    assert not mismatches, json.dumps(mismatches, indent=2)

    # Summary: {outcome: count}.
    counts: dict[str, int] = {}
    for outcome, _ in expected.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    summary = {k: v for k, v in report["summary"].items() if v}
    assert summary == counts

    # Audit: "The `edition` field says which key would be installed."
    if mode == "audit":
        for vm in report["vms"]:
            if (vm["outcome"], vm["reason"]) == ("would-remediate", "avma-channel"):
                assert vm.get("edition"), _name(vm["id"])

    # Exit code: 1 when some VM failed, else 3 when some VM is still deferred, else 0.
    assert rc == (1 if "failed" in counts else 3 if "deferred" in counts else 0)

    # Final licensing state of every VM (state_dump() shape, docs/simulator.md).
    state = {_name(vm_id): s for vm_id, s in json.loads(state_out.read_text()).items()}
    assert set(state) == set(estate)
    for name, vm in estate.items():
        s = state[name]
        assert s["os"] == vm["os"], name
        assert s["powerState"] == vm["powerState"], name
        outcome = expected[name]
        touched = mode == "apply" and outcome in (AVMA, KMS_REPAIR, NO_KMS)
        assert s["changed"] is touched, f"{name}: changed={s['changed']}, expected {touched}"
        if outcome in (NOT_RUNNING, OPTED_OUT, ("skipped", "not-windows")):
            # Decided from ARM facts alone: no Run Command may have run on the VM.
            assert s["runCommands"] == 0, f"{name}: runCommands={s['runCommands']}"
        if vm["os"] != "Windows":
            continue
        guest = vm["guest"]
        if not touched:
            for key in ("editionId", "channel", "licenseStatus", "kmsHost", "partialProductKey"):
                if key in guest:
                    assert s[key] == guest[key], f"{name}: {key} {s[key]!r} != {guest[key]!r}"
            continue
        assert s["editionId"] == guest["editionId"], name
        assert s["channel"] == "KMS_CLIENT", name
        assert s["kmsHost"] == AZURE_KMS, name
        if outcome == NO_KMS:
            assert s["licenseStatus"] != 1, name  # now an unlicensed KMS client
        else:
            assert s["licenseStatus"] == 1, name
        if outcome == KMS_REPAIR:  # "No key was changed."
            assert s["partialProductKey"] == guest["partialProductKey"], name
        else:  # the KMS client setup key of the edition (Microsoft's GVLK table) is installed
            assert s["partialProductKey"] == GVLK_TAIL[name], name
