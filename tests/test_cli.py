"""The CLI as a user runs it: the built-in estate, exit codes, JSON shape, the standalone simulator."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.catalog import select_key
from shared.cli import main
from shared.guest.facts import OsFacts
from shared.model import VmId
from simulator import Estate, Simulator

ROOT = Path(__file__).resolve().parent.parent
# The in-run retry waits, in all, with --simulate's default latency (0.3 s): 0.3 + 0.9 + 2.7 s.
IN_RUN_RETRY_WAIT_S = 3.9


def _expected_remediation(vm: dict[str, Any]) -> str | None:
    """What the decision table promises for a VM of the built-in estate under --apply."""
    guest = vm.get("guest")
    if vm["os"] != "Windows" or guest is None or guest["channel"] != "AVMA":
        return None
    opted = any(
        k.lower() == "avma-remediator-opt-out" and v.lower() not in ("false", "no", "0")
        for k, v in vm["tags"].items()
    )
    if opted or vm["powerState"] != "running" or not vm["agentReady"]:
        return None
    # A foreign Run Command (busySeconds) outlasting the run's own retries leaves the VM deferred; the
    # built-in estate's lasts 0.3 s, less than the first in-run retry waits on the simulator (issue 10).
    if vm.get("busySeconds", 0) > IN_RUN_RETRY_WAIT_S:
        return None
    facts = OsFacts(
        guest["caption"], "", guest["build"], guest["productType"], guest["sku"], guest["editionId"]
    )
    if guest["editionId"].lower() == "serverrdsh" or select_key(facts) is None:
        return None
    reachable = _reachable(vm)
    if not reachable and guest["licenseStatus"] == 1:
        return None  # never made worse: a Licensed AVMA VM keeps its activation while the KMS is unreachable
    return "remediated" if reachable else "failed"


def _reachable(vm: dict[str, Any]) -> bool:
    """The guest allows it (``kmsReachable``) and its network reaches the KMS (derived, issue 11)."""
    spec = Estate.default().get(vm["id"])
    assert spec is not None and spec.guest is not None
    return spec.guest.kms_reachable and spec.guest.network_reachable


def _expected_cause(vm: dict[str, Any]) -> str | None:
    """``kmsCause`` the engine must give a VM whose KMS fails: ``azure`` when its network blocks the
    path, ``in-guest`` when the network is clear; none for a VM with no NIC in the estate."""
    spec = Estate.default().get(vm["id"])
    assert spec is not None and spec.guest is not None
    if spec.nic is None:
        return None
    return "azure" if not spec.guest.network_reachable else "in-guest"


def test_demo_sweep_remediates_what_it_should_and_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_file = tmp_path / "state.json"
    code = main(["sweep", "--simulate", "--apply", "--output", "json", "--sim-state-out", str(state_file)])
    out = json.loads(capsys.readouterr().out)
    estate = Estate.default().to_dict()["vms"]
    assert len(out["vms"]) == len(estate) >= 50
    assert sum(out["summary"].values()) == len(estate)
    by_id = {v["id"].lower(): v for v in out["vms"]}
    initial = {v["id"].lower(): v for v in estate}
    final = {k.lower(): v for k, v in json.loads(state_file.read_text()).items()}

    expected_fixed = {k for k, v in initial.items() if _expected_remediation(v) == "remediated"}
    expected_failed = {k for k, v in initial.items() if _expected_remediation(v) == "failed"}
    assert len(expected_fixed) >= 15 and len(expected_failed) >= 2
    for key in expected_fixed:
        assert by_id[key]["outcome"] == "remediated", by_id[key]
        assert (final[key]["channel"], final[key]["licenseStatus"]) == ("KMS_CLIENT", 1)
    causes: set[str] = set()
    for key in expected_failed:
        assert (by_id[key]["outcome"], by_id[key]["reason"]) == ("failed", "activation-error:0xC004F074")
        found = by_id[key]
        assert found.get("kmsCause") == _expected_cause(initial[key]), found
        if found.get("kmsCause") == "azure":  # the cause and its exact fix
            for finding in found["kmsPath"]["findings"]:
                causes.add(finding["cause"])
                assert finding["text"][1:] in found["hint"] and all(
                    c in found["hint"] for c in finding["fix"]
                )
        elif found.get("kmsCause") == "in-guest":
            causes.add("in-guest")
            assert "inside the guest" in found["hint"]
        else:  # no NIC in the estate: the check cannot tell, the generic route hint stays
            assert "next hop Internet" in found["hint"]
    # the built-in estate shows every cause of issue 11
    assert causes >= {
        "route-to-appliance",
        "route-to-none",
        "route-to-gateway",
        "routes-for-retired-kms-only",
        "private-subnet-no-outbound",
        "nsg-denies-kms",
        "in-guest",
    }
    deferred = [v for v in out["vms"] if v["reason"] == "kms-unreachable"]
    assert any(
        f["cause"] == "internal-load-balancer-only" for v in deferred for f in v["kmsPath"]["findings"]
    )
    # only repairable KMS clients may change besides those; retail/MAK/OEM/multi-session/opted-out never
    for key, vm in initial.items():
        if key in expected_fixed or key in expected_failed:
            continue
        if by_id[key]["outcome"] == "remediated":
            assert vm["guest"]["channel"] == "KMS_CLIENT", by_id[key]
            continue
        assert final[key].get("changed") is False, (by_id[key], final[key])
    assert code == 1  # some VMs failed (unreachable KMS)
    # The README quotes the demo's summary line: it must be what the demo prints.
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    quoted = re.search(r"^(\d+) VMs, mode enforce: (.+)$", readme, re.MULTILINE)
    assert quoted is not None, "README lost the demo's summary line"
    counts = {kind: int(n) for n, kind in (part.split(" ")[::-1] for part in quoted.group(2).split(", "))}
    assert (int(quoted.group(1)), counts) == (len(estate), out["summary"])


def test_audit_is_the_default_and_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state_file = tmp_path / "state.json"
    code = main(["sweep", "--simulate", "--sim-state-out", str(state_file)])
    table = capsys.readouterr().out
    assert "would-remediate" in table and "remediated " not in table.replace("would-remediate", "")
    assert "Re-run with --apply" in table
    assert not any(v.get("changed") for v in json.loads(state_file.read_text()).values())
    assert code == 1  # the 2008 R2 on Windows PowerShell 2.0 cannot run detection, even in an audit


def test_check_one_vm(capsys: pytest.CaptureFixture[str]) -> None:
    vm = next(v for v in Estate.default().to_dict()["vms"] if _expected_remediation(v) == "remediated")
    assert main(["check", vm["id"], "--simulate", "--apply", "--output", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"] == {"remediated": 1}
    assert out["vms"][0]["id"] == vm["id"]


def test_check_by_computer_name_resolves_an_attached_vm_and_remediates_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An admin holding an alert has only its Computer: the guest host name of a migrated VM."""
    from tests.estates import windows_vm

    sub = "3f2c8a51-6b0e-4d7a-9c1e-2a5b7d9e4f10"
    erp = f"/subscriptions/{sub}/resourceGroups/rg-erp/providers/Microsoft.Compute/virtualMachines/vm-erp-prod-01"
    other = f"/subscriptions/{sub}/resourceGroups/rg-erp/providers/Microsoft.Compute/virtualMachines/vm-erp-test-01"
    estate = tmp_path / "estate.json"
    estate.write_text(
        json.dumps(
            {
                "vms": [
                    windows_vm(erp, createOption="Attach", computerName="ERPSRV01"),
                    windows_vm(other, createOption="Attach", computerName="ERPTEST01"),
                ]
            }
        )
    )
    state = tmp_path / "state.json"
    argv = ["check", "--computer", "erpsrv01.corp.example", "--simulate", str(estate), "--apply"]
    assert main([*argv, "--output", "json", "--sim-state-out", str(state)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"] == {"remediated": 1}
    assert out["vms"][0]["id"] == erp
    final = json.loads(state.read_text())
    assert final[erp]["channel"] == "KMS_CLIENT" and final[other]["changed"] is False

    # A name that resolves to nothing is an error for the caller (issue 10, item 4): exit 1, one line.
    assert main(["check", "--computer", "NOSUCHHOST", "--simulate", str(estate), "--output", "json"]) == 1
    captured = capsys.readouterr()
    missing = json.loads(captured.out)
    assert [(v["id"], v["outcome"], v["reason"]) for v in missing["vms"]] == [
        ("computer:NOSUCHHOST", "skipped", "not-found")
    ]
    assert "No VM in scope carries this computer name" in missing["vms"][0]["hint"]
    assert "has the computer name 'NOSUCHHOST'" in captured.err


def test_check_by_computer_name_checks_every_vm_that_carries_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Computer names are not unique (a clone, a rebuilt VM beside its old disk): every match is checked."""
    from tests.estates import windows_vm

    sub_a = "3f2c8a51-6b0e-4d7a-9c1e-2a5b7d9e4f10"
    sub_b = "8d41f6b2-95c3-4a8e-b7d0-1c6e2f3a9b54"
    base = "providers/Microsoft.Compute/virtualMachines"
    first = f"/subscriptions/{sub_a}/resourceGroups/rg-app/{base}/vm-app-01"
    clone = f"/subscriptions/{sub_b}/resourceGroups/rg-dr/{base}/vm-app-01-dr"
    other = f"/subscriptions/{sub_a}/resourceGroups/rg-app/{base}/vm-app-02"
    estate = tmp_path / "estate.json"
    estate.write_text(
        json.dumps(
            {
                "vms": [
                    windows_vm(first, createOption="Attach", computerName="APPSRV01"),
                    windows_vm(clone, createOption="Attach", computerName="APPSRV01"),
                    windows_vm(other, createOption="Attach", computerName="APPSRV02"),
                ]
            }
        )
    )
    state = tmp_path / "state.json"
    argv = ["check", "--computer", "APPSRV01", "--simulate", str(estate), "--apply", "--output", "json"]
    assert main([*argv, "--sim-state-out", str(state)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(v["id"] for v in out["vms"]) == sorted([first, clone])
    assert out["summary"] == {"remediated": 2}
    final = json.loads(state.read_text())
    assert final[first]["channel"] == final[clone]["channel"] == "KMS_CLIENT"
    assert final[other]["changed"] is False


def test_check_by_computer_name_fails_with_one_line_when_resource_graph_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resource Graph throttled past the inventory's retries: no verdict, exit 1, one clear line."""
    from shared.cli import _simulated_env

    with Simulator(Estate.default(), latency_s=0.01) as sim:
        for key, value in _simulated_env(sim.env()).items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        sim.throttle_resource_graph(100, resets_after_s=0)
        code = main(["check", "--computer", "APPSRV01", "--output", "json"])
        statuses = [q["status"] for q in sim.graph_queries()]
    captured = capsys.readouterr()
    assert code == 1
    assert statuses and set(statuses) == {429}  # it did ask, and was refused every time
    assert captured.out == ""  # no report: "not found" would be a false verdict
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("avma-remediator: cannot resolve 'APPSRV01'") and "throttled" in lines[0]


def _simulated(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    from shared.cli import _simulated_env

    for key, value in _simulated_env(sim.env()).items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)


UNKNOWN_SUB = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
WITHOUT_LEDGER = "avma-remediator: running without the ledger"


@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
def test_a_subscription_that_cannot_be_listed_is_one_line_that_says_so(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    verbose: bool,
) -> None:
    """A subscription Resource Graph does not see (a typo, or no read access: Resource Graph answers
    for the others and says nothing of it) is one line naming it, and the run exits 1."""
    with Simulator(Estate.default(), latency_s=0.01) as sim:
        _simulated(monkeypatch, sim)
        known = Estate.default().subscriptions[0]
        monkeypatch.setenv("TARGET_SUBSCRIPTIONS", f"{UNKNOWN_SUB},{known}")
        code = main([*(["-v"] if verbose else []), "sweep", "--output", "json"])
    captured = capsys.readouterr()
    assert code == 1
    # The once-said ledger notice (issue 10 item 14, tests/test_cli_ledger.py) is not a listing error.
    lines = [line for line in captured.err.splitlines() if not line.startswith(WITHOUT_LEDGER)]
    errors = [line for line in lines if line.startswith("avma-remediator:")]
    assert errors == [
        f"avma-remediator: subscription {UNKNOWN_SUB} could not be listed: not-found: Resource Graph"
        " sees no such subscription (mistyped, or the identity cannot read it)"
    ]
    assert lines == errors, captured.err
    sweep_records = [r for r in caplog.records if r.name == "shared.sweep"]
    assert bool(sweep_records) is verbose  # the sweep's own record only under -v
    out = json.loads(captured.out)
    assert list(out["listingErrors"]) == [UNKNOWN_SUB]
    # The subscription that exists was swept all the same.
    assert {VmId.parse(v["id"]).subscription_id for v in out["vms"]} == {known}


@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
def test_a_failed_listing_query_is_reported_for_everything_it_covered(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    verbose: bool,
) -> None:
    """Resource Graph refusing the listing (429 until the retries are spent) is not one
    subscription's failure: each subscription the query covered gets one line, what the service
    said first (the SDK's text spans lines), and -v logs the whole answer."""
    subs = list(Estate.default().subscriptions[:2])
    with Simulator(Estate.default(), latency_s=0.01) as sim:
        _simulated(monkeypatch, sim)
        monkeypatch.setenv("TARGET_SUBSCRIPTIONS", ",".join(subs))
        sim.throttle_resource_graph(50, resets_after_s=0)
        code = main([*(["-v"] if verbose else []), "sweep", "--output", "json"])
    captured = capsys.readouterr()
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("avma-remediator:")]
    assert errors == [
        # Resource Graph's reason is in its details; its top message is only "Please provide below
        # info when asking for support" (shared/azure/inventory.py, _service_words).
        f"avma-remediator: subscription {sub} could not be listed: throttled: (RateLimiting) Client"
        " application has been throttled and should not attempt to repeat the request until an"
        " amount of time has elapsed. Please see https://aka.ms/resourcegraph-throttling for help."
        " (-v shows the rest)"
        for sub in subs
    ]
    if verbose:
        assert "Code: RateLimiting" in caplog.text  # the whole answer, logged
    else:
        assert captured.err.splitlines() == errors, captured.err
    out = json.loads(captured.out)
    assert out["vms"] == [] and sorted(out["listingErrors"]) == sorted(subs)
    assert all("Code: RateLimiting" in text for text in out["listingErrors"].values())


def test_without_target_subscriptions_the_sweep_lists_everything_resource_graph_sees(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No TARGET_SUBSCRIPTIONS and no MANAGEMENT_GROUP_ID: one Resource Graph listing with no scope
    (every subscription the identity can read), and no ARM list of subscriptions or VMs."""
    estate = Estate.default()
    with Simulator(estate, latency_s=0.01) as sim:
        _simulated(monkeypatch, sim)
        monkeypatch.delenv("TARGET_SUBSCRIPTIONS")
        code = main(["sweep", "--output", "json"])
        listings = [q for q in sim.graph_queries() if q.get("kind") == "list_vms"]
        paths = [r["path"].lower() for r in sim.request_log()]
    out = json.loads(capsys.readouterr().out)
    assert code == 1  # the built-in estate's 2008 R2 cannot run detection, as in the demo
    assert len(out["vms"]) == len(estate.vms) and out["listingErrors"] == {}
    assert [(q["subscriptions"], q["managementGroups"], q["top"]) for q in listings] == [([], [], 1000)]
    assert "/subscriptions" not in paths
    assert not any(p.endswith("/providers/microsoft.compute/virtualmachines") for p in paths)


def test_without_v_a_log_record_on_stderr_is_one_line() -> None:
    """Whatever logs an SDK message (Resource Graph's first line is "Please provide below info when
    asking for support"), the CLI's stderr shows one line of it; -v leaves records whole."""
    import logging

    from shared.cli import _FirstLine

    record = logging.LogRecord(
        "shared.x", logging.WARNING, __file__, 1, "lookup failed: %s", ("(BadRequest) first\nCode: x",), None
    )
    line = _FirstLine(logging.Formatter("%(levelname)s %(name)s: %(message)s")).format(record)
    assert line == "WARNING shared.x: lookup failed: (BadRequest) first (-v shows the rest)"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check", "not-a-vm-id", "--simulate"], "not a virtual machine resource id"),
        (["check", "--simulate"], "VM_ID or --computer"),
        (["check", "/subscriptions/x", "--computer", "HOST1", "--simulate"], "VM_ID or --computer"),
        (["check", "--computer", "x' or 1==1 //", "--simulate"], "not a computer name"),
        (["sweep", "--subscription", "abc", "--simulate"], "not a subscription id"),
        (["sweep", "--sim-state-out", "x.json"], "needs --simulate"),
        (["sweep", "--simulate", "--concurrency", "0"], "--concurrency"),
        (["sweep", "--simulate", "/nonexistent/estate.json"], "estate file"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_estate_file_names_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "estate.json"
    bad.write_text(json.dumps({"vms": [{"id": "/subscriptions/x", "os": "Windows"}]}))
    assert main(["sweep", "--simulate", str(bad)]) == 2
    assert "vms[0]" in capsys.readouterr().err


def test_bad_configuration_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AZURE_CLOUD", "AzureGermany")
    assert main(["sweep", "--simulate"]) == 2
    assert "AZURE_CLOUD" in capsys.readouterr().err


STRAY_CLIENT_ID = "11111111-2222-3333-4444-555555555555"


def test_a_client_id_left_in_the_shell_does_not_break_a_simulated_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The simulator checks client_id as the platform does; the user's own one must not leak in."""
    monkeypatch.setenv("AZURE_CLIENT_ID", STRAY_CLIENT_ID)
    vm = next(v for v in Estate.default().to_dict()["vms"] if _expected_remediation(v) == "remediated")
    code = main(["check", vm["id"], "--simulate", "--output", "json"])
    assert json.loads(capsys.readouterr().out)["vms"][0]["outcome"] == "would-remediate"
    assert code == 0
    assert os.environ["AZURE_CLIENT_ID"] == STRAY_CLIENT_ID  # restored afterwards


def test_standalone_simulator_serves_another_process() -> None:
    """`simulator serve` prints settings; a separate `avma-remediator check` uses them as a user would."""
    serve = subprocess.Popen(
        [sys.executable, "-m", "shared", "simulator", "serve", "--latency", "0.01"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # A client id of the user's own service principal is in the shell; the printed lines
        # (export and unset, as a shell runs them) must leave the simulated app's identity.
        env = {**os.environ, "AZURE_CLIENT_ID": STRAY_CLIENT_ID}
        assert serve.stdout is not None
        for line in serve.stdout:
            if line.startswith("export "):
                key, _, value = line[7:].strip().partition("=")
                env[key] = value
            if line.startswith("unset "):
                env.pop(line[6:].strip(), None)
            if line.startswith("# Ctrl-C"):
                break
        assert env["ARM_ENDPOINT"].startswith("https://127.0.0.1:")
        vm = next(v for v in Estate.default().to_dict()["vms"] if _expected_remediation(v) == "remediated")
        done = subprocess.run(
            [sys.executable, "-m", "shared", "check", vm["id"], "--output", "json"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["vms"][0]["outcome"] == "would-remediate"
    finally:
        serve.terminate()
        serve.wait(timeout=10)


SCOPE_SUB = "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7"
OTHER_SUB = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def _in(sub: str, name: str) -> str:
    return f"/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}"


@pytest.mark.parametrize(
    "command", [["check", _in(OTHER_SUB, "foreign")], ["sweep", "--subscription", OTHER_SUB]]
)
def test_the_cli_refuses_vms_outside_target_subscriptions(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``check`` of a VM elsewhere ends ``skipped: out-of-scope`` with no Run Command; ``sweep`` of a
    subscription outside TARGET_SUBSCRIPTIONS is a usage error."""
    import asyncio

    from shared.cli import UsageError, _execute, build_parser
    from simulator import Simulator
    from tests.estates import windows_vm

    estate = Estate.from_dict(
        {
            "subscriptions": [SCOPE_SUB, OTHER_SUB],
            "vms": [windows_vm(_in(SCOPE_SUB, "inside")), windows_vm(_in(OTHER_SUB, "foreign"))],
        }
    )
    with Simulator(estate, latency_s=0.01) as sim:
        _simulated(monkeypatch, sim)  # azure-identity reads the identity endpoint from os.environ
        env = {**sim.env(), "TARGET_SUBSCRIPTIONS": SCOPE_SUB}
        args = build_parser().parse_args([*command, "--apply", "--output", "json"])
        if command[0] == "sweep":
            with pytest.raises(UsageError, match="not in TARGET_SUBSCRIPTIONS"):
                asyncio.run(_execute(args, env))
        else:
            assert asyncio.run(_execute(args, env)) == 0
            out = json.loads(capsys.readouterr().out)
            assert [(v["outcome"], v["reason"]) for v in out["vms"]] == [("skipped", "out-of-scope")]
        assert sim.run_log(_in(OTHER_SUB, "foreign")) == []
