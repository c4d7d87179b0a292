"""Faults: each kind as the simulator injects it, the engine fixes they revealed, and a chaos run.

The chaos run is bench/chaos.py at a smaller scale (a few hundred VMs, every fault kind on a
schedule so that each one fires): it must end with zero violations of the invariants, every fault
kind must have been injected (so the test fails if faults silently stop), and the invariant checks
themselves are shown to fail on an engine that breaks a rule on purpose.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from azure.storage.queue.aio import QueueClient

from shared import triggers
from shared.azure.compute import ArmUnavailable, ComputeGateway
from shared.azure.credentials import make_credential
from shared.azure.logs import SPP_QUERY
from shared.guest.scripts import detect_command
from shared.ledger import Ledger, TableMissing
from shared.model import VmId
from shared.settings import ConfigError, Mode, Settings
from simulator import Estate, EstateError, Simulator
from simulator.faults import KINDS, FaultPlan, parse_option

ROOT = Path(__file__).resolve().parent.parent
SUB = "3f2c8a51-6b0e-4d7a-9c1e-2a5b7d9e4f10"
API = "api-version=2025-04-01"


def _load_chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaos", ROOT / "bench" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


def estate(faults: dict[str, Any], **mix: float) -> Estate:
    recipe = Estate.generate(count=4, seed=3, mix=mix or {"avma": 1.0}, subscriptions=1)
    return recipe.with_faults(FaultPlan.from_dict(faults))


class Arm:
    """Plain HTTPS calls to the simulator (status, headers, JSON), as ARM answers them."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.tls = ssl.create_default_context(cafile=sim.ca_bundle)
        self.token = sim.issue_token()

    def __call__(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
        url = f"{self.sim.arm_endpoint}{path}{'&' if '?' in path else '?'}{API}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, context=self.tls) as response:
                raw = response.read()
                return response.status, dict(response.headers), json.loads(raw) if raw else None
        except urllib.error.HTTPError as error:
            raw = error.read()
            return error.code, dict(error.headers), json.loads(raw) if raw else None

    def detect(self, vm_id: str) -> tuple[int, dict[str, str], Any]:
        return self("POST", vm_id + "/runCommand", detect_command("azkms.core.windows.net", 1688))


def wait_done(sim: Simulator, vm_id: str) -> dict[str, Any]:
    for _ in range(200):
        last = sim.run_log(vm_id)[-1]
        if last["status"] != "InProgress":
            return last
        time.sleep(0.01)
    raise AssertionError("the Run Command never finished")


def serve(
    sim_factory: Callable[..., Simulator], faults: dict[str, Any], *, latency_s: float = 0.01, **mix: float
) -> Simulator:
    """A simulator (the conftest fixture stops it) of a few VMs with these faults."""
    return sim_factory(estate(faults, **mix), latency_s=latency_s)


# --- the fault plan: estate file and command line ------------------------------------------------


def test_a_faults_section_round_trips_and_every_kind_is_known() -> None:
    section = {
        "seed": 5,
        "armThrottling": {"timeScale": 3, "writes": {"size": 20, "perSecond": 2}},
        "serverError": {"rate": 0.1, "afterAccept": 1},
        "runCommandHang": {"every": 7, "seconds": 2},
        "agentFlap": {"rate": 0.5, "periodSeconds": 0.2},
        "tokenError": {"every": 10, "burst": 4},
        "logPartialError": 0.5,
    }
    plan = FaultPlan.from_dict(section)
    assert FaultPlan.from_dict(plan.to_dict()) == plan
    assert plan.to_dict()["serverError"] == {"rate": 0.1, "afterAccept": 1.0}
    loaded = Estate.from_dict({"generate": {"count": 2, "seed": 1}, "faults": section})
    assert loaded.faults == plan and Estate.from_dict(loaded.to_dict()).faults == plan
    assert set(FaultPlan().to_dict()) == {"seed"} and not FaultPlan().enabled


@pytest.mark.parametrize(
    ("section", "path"),
    [
        ({"serverErrors": 0.1}, "$.faults.serverErrors"),
        ({"serverError": 1.5}, "$.faults.serverError"),
        ({"serverError": {"rate": 0.1, "every": 3}}, "$.faults.serverError"),
        ({"tokenError": {"every": 3, "burst": 4}}, "$.faults.tokenError.burst"),
        ({"runCommandHang": {"rate": 0.1, "minutes": 3}}, "$.faults.runCommandHang.minutes"),
        ({"armThrottling": {"scale": 2}}, "$.faults.armThrottling.scale"),
        (
            {"armThrottling": {"timeScale": 2, "reads": {"size": 0, "perSecond": 1}}},
            "$.faults.armThrottling.reads.size",
        ),
        ({"seed": "x"}, "$.faults.seed"),
    ],
)
def test_a_bad_faults_section_names_its_path(section: dict[str, Any], path: str) -> None:
    with pytest.raises(EstateError) as caught:
        Estate.from_dict({"vms": [], "faults": section})
    assert caught.value.path == path


@pytest.mark.parametrize(("seconds", "accepted"), [(5_400, True), (5_400.5, False), (86_400, False)])
def test_a_hang_is_no_longer_than_run_command_s_90_minutes(seconds: float, accepted: bool) -> None:
    """Run Command times out after 90 minutes (MicrosoftDocs/azure-compute-docs run-command.md,
    Restrictions): a command that hangs longer is one Azure cannot give."""
    section = {"runCommandHang": {"rate": 0.1, "seconds": seconds}}
    if accepted:
        assert Estate.from_dict({"vms": [], "faults": section}).faults.hang_seconds == seconds
        return
    with pytest.raises(EstateError) as caught:
        Estate.from_dict({"vms": [], "faults": section})
    assert caught.value.path == "$.faults.runCommandHang.seconds"


def test_command_line_options() -> None:
    assert parse_option("serverError=0.02") == ("serverError", 0.02)
    assert parse_option("tokenError=every:150:burst:5") == ("tokenError", {"every": 150, "burst": 5})
    assert parse_option("armThrottling=3") == ("armThrottling", {"timeScale": 3.0})
    plan = FaultPlan.from_dict({"serverError": 0.5}).with_options(
        ["serverError=off", "vmVanish=every:3"], seed=9
    )
    assert (plan.seed, plan.schedule("serverError").active, plan.schedule("vmVanish").every) == (9, False, 3)
    for bad in (
        "nope=1",
        "serverError",
        "serverError=lots",
        "tokenError=every:x",
        "tokenError=every:3:bursts:2",
    ):
        with pytest.raises(EstateError):
            parse_option(bad)


def test_simulator_serve_takes_fault_options(capsys: pytest.CaptureFixture[str]) -> None:
    from shared import cli

    assert cli.main(["simulator", "serve", "--fault", "bogus=1"]) == 2
    assert "bogus=1" in capsys.readouterr().err


# --- each kind, as the simulator injects it ----------------------------------------------------


def test_arm_throttling_is_computes_own_policy_which_the_subscription_budget_does_not_show(
    sim_factory: Callable[..., Simulator],
) -> None:
    """Compute's per-minute policies (troubleshooting-throttling-errors.md): their remainder in
    ``x-ms-ratelimit-remaining-resource``, a 429 ``OperationNotAllowed`` naming the policy, with
    ``Retry-After``; ARM's subscription budget headers stay ARM's, so no pacer on them sees it coming."""
    # A token a second: the four reads below must come within a second for the fourth to be refused
    # (two a second left half of that, which a machine at load 6 did not always give them).
    sim = serve(sim_factory, {"armThrottling": {"timeScale": 1, "reads": {"size": 3, "perSecond": 1}}})
    arm, vm = Arm(sim), sim.estate.vms[0].id
    answers = [arm("GET", vm)[1] for _ in range(3)]
    assert [h["x-ms-ratelimit-remaining-resource"] for h in answers] == [
        f"Microsoft.Compute/LowCostGet3Min;{n}" for n in (2, 1, 0)
    ]
    assert all(int(h["x-ms-ratelimit-remaining-subscription-reads"]) >= 240 for h in answers)
    status, headers, body = arm("GET", vm)
    assert status == 429 and body["error"]["code"] == "OperationNotAllowed"
    (detail,) = body["error"]["details"]
    assert detail["code"] == "TooManyRequests" and detail["target"] == "LowCostGet3Min"
    violation = json.loads(detail["message"])
    assert violation["operationGroup"] == "LowCostGet3Min" and violation["measuredRequestCount"] == 4
    assert violation["allowedRequestCount"] == 3 + 1 * 180 and violation["startTime"] < violation["endTime"]
    assert 0 < float(headers["Retry-After"]) <= 1.01
    assert headers["x-ms-ratelimit-remaining-resource"] == "Microsoft.Compute/LowCostGet3Min;0"
    assert int(headers["x-ms-ratelimit-remaining-subscription-reads"]) >= 240  # ARM's own: plenty
    # Each policy has its own bucket: a list is a high-cost read, a Run Command a VM write.
    listing = "/".join(vm.split("/")[:3]) + "/providers/Microsoft.Compute/virtualMachines"
    status, headers, _ = arm("GET", listing)
    assert (
        status == 200
        and headers["x-ms-ratelimit-remaining-resource"] == "Microsoft.Compute/HighCostGet3Min;2"
    )
    status, headers, _ = arm.detect(vm)
    assert status == 202 and headers["x-ms-ratelimit-remaining-resource"] == "Microsoft.Compute/PutVM3Min;199"
    assert int(headers["x-ms-ratelimit-remaining-subscription-writes"]) >= 190
    time.sleep(1.05)
    assert arm("GET", vm)[0] == 200  # the policy's bucket refilled
    assert sim.faults()["armThrottling"] == 1


def test_server_errors_and_a_5xx_that_still_started_the_command(
    sim_factory: Callable[..., Simulator],
) -> None:
    sim = serve(sim_factory, {"serverError": {"every": 1, "afterAccept": 1}})
    arm, vm = Arm(sim), sim.estate.vms[0].id
    status, headers, body = arm("GET", vm)
    assert status in (500, 503) and body["error"]["code"] in ("InternalServerError", "ServiceUnavailable")
    assert (status == 503) == ("Retry-After" in headers)
    status, _, _ = arm.detect(vm)
    assert status in (500, 503)
    assert sim.run_log(vm)[0]["faults"] == ["serverError"]  # accepted although the caller got a 5xx
    assert sim.faults()["serverError"] == 2


def test_run_command_busy_operation_failed_and_hang(sim_factory: Callable[..., Simulator]) -> None:
    sim = serve(sim_factory, {"runCommandBusy": {"every": 2}})
    arm, vm = Arm(sim), sim.estate.vms[0].id
    assert arm.detect(vm)[0] == 202
    wait_done(sim, vm)
    status, _, body = arm.detect(vm)
    assert status == 409 and body["error"]["code"] == "Conflict" and len(sim.run_log(vm)) == 1

    sim = serve(sim_factory, {"operationFailed": {"every": 1}})
    arm, vm = Arm(sim), sim.estate.vms[0].id
    arm.detect(vm)
    entry = wait_done(sim, vm)
    assert entry["status"] == "Failed" and "operationFailed" in entry["faults"]
    assert sim.faults()["operationFailed"] == 1

    sim = serve(sim_factory, {"runCommandHang": {"every": 1, "seconds": 0.3}})
    arm, vm = Arm(sim), sim.estate.vms[0].id
    arm.detect(vm)
    time.sleep(0.05)
    assert sim.run_log(vm)[0]["status"] == "InProgress"
    assert arm.detect(vm)[0] == 409  # the hung command still holds the VM
    assert wait_done(sim, vm)["status"] == "Succeeded"
    counters = sim.counters()
    assert counters["conflicts"] and not counters["liveConflicts"]  # a hung command is abandoned, not live


def test_a_second_command_against_a_live_one_is_counted(sim_factory: Callable[..., Simulator]) -> None:
    sim = serve(sim_factory, {}, latency_s=0.3)
    arm, vm = Arm(sim), sim.estate.vms[0].id
    assert arm.detect(vm)[0] == 202
    assert arm.detect(vm)[0] == 409
    assert sim.counters()["liveConflicts"] == {vm: 1}
    assert sim.max_concurrent_run_commands() == 1


def test_vm_vanishes_after_detection(sim_factory: Callable[..., Simulator]) -> None:
    sim = serve(sim_factory, {"vmVanish": {"every": 1}})
    arm = Arm(sim)
    for spec in sim.estate.vms:
        arm.detect(spec.id)
        wait_done(sim, spec.id)
    gone = sim.vanished()
    assert set(gone) == {vm.id for vm in sim.estate.vms} and set(gone.values()) <= {"deleted", "deallocated"}
    assert sim.faults()["vmVanish"] == len(sim.estate.vms)
    for vm_id, how in gone.items():
        status, _, body = arm.detect(vm_id)
        assert (status, body["error"]["code"]) == (
            (404, "ResourceNotFound") if how == "deleted" else (409, "OperationNotAllowed")
        )


def test_a_flapping_agent_alternates(sim_factory: Callable[..., Simulator]) -> None:
    sim = serve(sim_factory, {"agentFlap": {"rate": 1, "periodSeconds": 0.1}})
    arm, vm = Arm(sim), sim.estate.vms[0].id
    seen = set()
    for _ in range(12):
        view = arm("GET", vm + "/instanceView")[2]
        seen.add(view["vmAgent"]["statuses"][0]["displayStatus"])
        time.sleep(0.05)
    assert seen == {"Ready", "Not Ready"} and sim.faults()["agentFlap"] >= 1


def test_output_truncated_and_garbled(sim_factory: Callable[..., Simulator]) -> None:
    sim = serve(sim_factory, {"outputTruncated": {"every": 1}, "outputGarbled": {"every": 1}})
    arm = Arm(sim)
    for spec in sim.estate.vms:
        _, headers, _ = arm.detect(spec.id)
        wait_done(sim, spec.id)
        operation = headers["Location"].split(sim.arm_endpoint, 1)[1]
        result = arm("GET", operation.split("?")[0] + "?monitor=true")[2]
        stdout = result["value"][0]["message"]
        assert len(stdout.encode("utf-8")) <= 4096 + 3 * 8  # U+FFFD is 3 bytes where 1 was
        assert "\ufffd" in stdout
    assert sim.faults()["outputTruncated"] == sim.faults()["outputGarbled"] == len(sim.estate.vms)


def test_token_endpoint_errors_and_partial_log_results(sim_factory: Callable[..., Simulator]) -> None:
    sim = serve(sim_factory, {"tokenError": {"every": 2}, "logPartialError": {"every": 1}})
    url = f"{sim.identity_endpoint}?api-version=2019-08-01&resource=https://management.azure.com"
    codes = []
    for _ in range(4):
        request = urllib.request.Request(url, headers={"X-IDENTITY-HEADER": sim.identity_header})
        try:
            with urllib.request.urlopen(request) as response:
                codes.append(response.status)
        except urllib.error.HTTPError as error:
            codes.append(error.code)
    assert codes == [200, 500, 200, 500] and sim.faults()["tokenError"] == 2
    token = sim.issue_token("https://api.loganalytics.io")
    request = urllib.request.Request(
        f"{sim.arm_endpoint}/v1/workspaces/{sim.workspace_id}/query",
        data=json.dumps({"query": SPP_QUERY}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(
        request, context=ssl.create_default_context(cafile=sim.ca_bundle)
    ) as response:
        assert json.loads(response.read())["error"]["code"] == "PartialError"
    assert sim.faults()["logPartialError"] == 1


def test_no_faults_no_counts(sim_factory: Callable[..., Simulator]) -> None:
    sim = serve(sim_factory, {})
    arm, vm = Arm(sim), sim.estate.vms[0].id
    _, headers, _ = arm("GET", vm)
    # The remaining budget is ARM's documented one (simulator/throttle.py), not a fault's.
    budget = {h.lower(): v for h, v in headers.items() if h.lower().startswith("x-ms-ratelimit")}
    assert budget == {"x-ms-ratelimit-remaining-subscription-reads": "249"}
    assert sim.faults() == dict.fromkeys(KINDS, 0)


# --- what the faults revealed in the engine ----------------------------------------------------


def use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> dict[str, str]:
    """azure-identity's ManagedIdentityCredential reads the process environment."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


async def test_a_run_command_post_answered_5xx_is_never_sent_again_by_the_sdk(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ARM may accept a Run Command and still answer 500/503; azure-core would send the POST again,
    and once the first command has finished the repeat runs the script a second time."""
    sim = serve(sim_factory, {"serverError": {"every": 1, "afterAccept": 1}}, latency_s=0.0)
    env = use_env(monkeypatch, sim.env())
    settings = Settings.from_env(env)
    vm = sim.estate.vms[0].id
    credential = make_credential(settings, env)
    async with credential, ComputeGateway(credential, settings) as gateway:
        with pytest.raises(ArmUnavailable):
            await gateway.run_command(VmId.parse(vm), detect_command(settings.kms_host, settings.kms_port))
    assert len(sim.run_log(vm)) == 1


async def test_a_throttled_run_command_post_is_still_retried(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One token, refilled after 2 s: the second POST comes sooner than that however slow the
    # machine is (a 20/s refill let a loaded machine's second POST find the bucket full again).
    sim = serve(sim_factory, {"armThrottling": {"timeScale": 1, "writes": {"size": 1, "perSecond": 0.5}}})
    env = use_env(monkeypatch, sim.env())
    settings = Settings.from_env(env)
    credential = make_credential(settings, env)
    async with credential, ComputeGateway(credential, settings) as gateway:
        for spec in sim.estate.vms[:2]:  # the second POST finds the bucket empty, waits, succeeds
            out, _ = await gateway.run_command(
                VmId.parse(spec.id), detect_command(settings.kms_host, settings.kms_port)
            )
            assert "AVMA-REMEDIATOR-RESULT" in out
    assert sim.faults()["armThrottling"] >= 1
    assert sum(len(sim.run_log(spec.id)) for spec in sim.estate.vms) == 2


def test_a_ca_bundle_name_too_long_for_the_file_system_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="AZURE_CA_BUNDLE"):
        Settings.from_env({"AZURE_CA_BUNDLE": "x" * 5000})


async def test_after_a_storage_loss_the_app_recreates_its_table_instead_of_failing_forever(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch, restartable_azurite: Any
) -> None:
    azurite = restartable_azurite  # restarted below: the in-memory table and queues are lost
    sim = serve(sim_factory, {}, kms_healthy=1.0)
    env = use_env(
        monkeypatch,
        {**sim.env(), "AzureWebJobsStorage": azurite.connection_string, "LEDGER_TABLE": "lossrecovery"},
    )
    body = json.dumps({"reason": "manual", "vmId": sim.estate.vms[0].id})
    assert [o.kind.value for o in await triggers.work(body, env=env)] == ["healthy"]
    await asyncio.to_thread(azurite.restart)  # in memory: the table and the queues are gone
    with pytest.raises(TableMissing):
        await triggers.work(body, env=env)  # this invocation fails: its message is retried
    assert [o.kind.value for o in await triggers.work(body, env=env)] == ["healthy"]
    # A message nested too deeply to decode still gets its poison record.
    await triggers.poison("[" * 5000, env=env)
    async with Ledger.from_settings(Settings.from_env(env)) as ledger:
        rows = await ledger.history("unparsable-message")
    assert [(r["outcome"], r["reason"]) for r in rows] == [("failed", "poison")]
    async with QueueClient.from_connection_string(azurite.connection_string, "vm-checks") as queue:
        await queue.get_queue_properties()  # the work queue was made again too


# --- the chaos run ---------------------------------------------------------------------------

# Every kind on a schedule, so that each fires two or three times in a run of some 170 VMs (an
# unreadable Run Command answer about one in 15: four for one item, the bound, about 2e-5).
TEST_FAULTS: dict[str, Any] = {
    # Compute's own policies (docs/simulator.md, Faults), which ARM's headers do not show: buckets of
    # four tokens, so that a burst of the 24 workers meets 429s when the machine is loaded; the read
    # policies refilled at 20/s per subscription, so that an idle machine's opening wave (its
    # requests spread out, at 80/s it never met one) meets them too, above the run's pace of about
    # 5 reads/s per subscription. (Before the pacer, a bucket refilled at 16/s held the whole run to a
    # few invocations a second: the retries of a burst all came back at once; one of a single token
    # answered 429 to every other request under load.)
    "armThrottling": {
        "timeScale": 2,
        "reads": {"size": 4, "perSecond": 10},
        "writes": {"size": 4, "perSecond": 40},
    },
    "serverError": {"every": 100},
    "runCommandBusy": {"every": 45},
    "operationFailed": {"every": 50},
    "runCommandHang": {"every": 40, "seconds": 3},
    "vmVanish": {"every": 50},
    # Ready and Not Ready 3 s each: longer than the retries' 1 s, so that the looks walk through
    # the phases (a flap faster than the retries can alias with them: a flapping VM was seen Not
    # Ready at all of its 17 looks, 1.2 s apart, with a 0.6 s cycle). A flap is counted when a look
    # finds the agent Not Ready, half the time: every 25th VM (about six, most looked at once) went
    # unseen in a full suite run at load 5; every 10th leaves that to chance about once in 10^5.
    "agentFlap": {"every": 10, "periodSeconds": 3},
    "outputTruncated": {"every": 45},
    "outputGarbled": {"every": 45},
    "tokenError": {"every": 4, "burst": 3},  # on the refreshes of the run's short-lived tokens
    "logPartialError": {"every": 1},
}
# Every category of the bench's estate but one: a VM whose agent is never Ready is retried until its
# item's retry delays add up to the deadline (some 16 looks, by design), which made it the long tail
# of every pass. The deadline path is the bench's (bench/chaos.py) and the worker tests'.
SMALL_MIX = {k: v for k, v in chaos.CHAOS_MIX.items() if k != "avma_agent_not_ready"}
SMALL = chaos.ChaosConfig(
    vms=140,
    mix=SMALL_MIX,
    audit_vms=30,
    workers=24,
    faults=TEST_FAULTS,
    dup_share=0.05,
    dup_copies=4,
    computer_items=4,
    malformed=2,
    poison_pills=2,  # the first is the "hard" one, whose poison handler fails too
    audit_poison_pills=0,  # their path (some 10 s of redeliveries) is the enforce pass's, overlapped
    log_scan_every_s=2.0,
    restart_after=0.25,
    defer_deadline_h=0.005,  # 18 s of retry delays: some 16 looks, 1 s apart
    audit_defer_deadline_h=0.005,
    time_bound_s=600,  # a bound for a machine shared with other jobs; an idle one drains far sooner
    # The harness's own faults, scaled down: two VMs per crash point, short outages.
    crashes_per_point=2,
    crash_visibility_s=2.0,
    table_outage_s=4.0,
    queue_outage_s=2.0,
    graph_throttle=4,
    fan_out=25,
    # A killed worker's lease holds its VM for LEASE_SECONDS, the tail of the run: shorter here (16 s
    # covers the worst-case workflow of 2 s + 2 x 2 s + 6 ledger writes x (3 x 0.5 s + 0.15 s); a
    # ledger try that takes longer on a loaded machine is retried, at worst the message is).
    ledger_try_timeout_s=0.5,
    ledger_backoff_s=0.05,
    arm_call_timeout_s=2.0,
    run_command_timeout_s=2.0,
    lease_s=16.0,
)


@pytest.fixture(scope="module")
def small_run(restartable_azurite: Any) -> dict[str, Any]:
    """bench/chaos.py at a small scale, run once for the tests below (the full run is the bench's)."""
    return asyncio.run(chaos.run_chaos(SMALL, azurite=restartable_azurite))


@pytest.mark.slow
def test_chaos_run_loses_nothing_and_breaks_no_rule(small_run: dict[str, Any]) -> None:
    passes = small_run["passes"]
    examples = {name: p["examples"] for name, p in passes.items() if p["examples"]}
    assert small_run["violations"] == dict.fromkeys(small_run["violations"], 0), examples
    assert set(small_run["violations"]) >= {
        "lost",
        "remediatedWithoutCause",
        "concurrentRunCommands",
        "changedInAudit",
        "remediatedTwice",
        "verdict_vs_state",
        "unrecorded_run_commands",
        "out_of_scope_run_commands",
    }


@pytest.mark.slow
def test_chaos_run_injects_every_fault_kind(small_run: dict[str, Any]) -> None:
    never = [kind for kind, count in small_run["faults"].items() if count == 0]
    assert never == [], f"fault kinds never injected: {never}"
    assert set(small_run["faults"]) == {*KINDS, "azuriteRestart", *chaos.HARNESS_FAULTS}


@pytest.mark.slow
def test_chaos_run_remediates_plans_and_goes_through_the_storage_loss_and_the_poison_path(
    small_run: dict[str, Any],
) -> None:
    passes = small_run["passes"]
    enforce = passes["enforce"]
    assert enforce["remediatedVms"] > 0 and small_run["outcomes"].get("remediated", 0) > 0
    assert passes["audit"]["outcomes"].get("would-remediate", 0) > 0
    assert enforce["storageLoss"]["restarts"] == 1
    assert enforce["invocations"]["poisoned"] == SMALL.poison_pills  # the host's poison path ran
    assert enforce["messages"]["harness"]["duplicate"] == SMALL.dup_copies * round(
        SMALL.vms * SMALL.dup_share
    )
    assert enforce["lastResortDrain"]["recorded"] >= 1  # the hard pill, drained


@pytest.mark.slow
def test_chaos_run_kills_workers_at_every_point_and_rides_out_the_storm(small_run: dict[str, Any]) -> None:
    # Killed at every point of the workflow; the alerts posted in the queue outage were answered
    # 503 and then accepted; the oversized one capped; hostile ids never queued.
    enforce = small_run["passes"]["enforce"]
    assert set(enforce["crashes"]) == set(chaos.CRASH_POINTS), enforce["crashes"]
    storm = enforce["storm"]
    assert storm["alert503"] > 0 and all(a["status"] == 202 for a in storm["alerts"])
    assert storm["fanOut"]["accepted"] == SMALL.max_targets_per_alert < storm["fanOut"]["targets"]
    assert storm["hostileEventsQueued"] == 0


# --- the checks can fail: an engine that breaks a rule on purpose -----------------------------

# Tiny runs, each with only what its mutant needs: no storm, no hostile input, no poison pill, no
# restart, the simulator on a thread and the session's Azurite (each run empties the queues it uses).
BROKEN = chaos.ChaosConfig(
    storm=False,
    hostile=False,
    vms=0,
    audit_vms=0,
    workers=16,
    faults={},
    mix={"avma": 1.0},
    dup_share=1.0,
    dup_copies=4,
    computer_items=0,
    unknown_computers=0,
    malformed=0,
    poison_pills=0,
    restarts=0,
    log_scan_every_s=1.0,
    defer_deadline_h=0.0015,
    audit_defer_deadline_h=0.0015,
    time_bound_s=60,
    simulator_process=False,
)


@pytest.fixture
def shared_azurite(azurite: Any) -> Any:
    """The session's Azurite: these runs restart nothing, and each empties the queues it uses."""
    return azurite


@pytest.mark.slow
async def test_the_checks_catch_a_worker_without_leases(
    monkeypatch: pytest.MonkeyPatch, shared_azurite: Any
) -> None:
    from shared.ledger import Lease

    async def no_lease(self: Ledger, vm_id: VmId, *, owner: str, now: Any = None) -> Lease:
        return Lease(vm_id, owner, "t", None, None, "")  # type: ignore[arg-type]

    async def no_release(self: Ledger, lease: Lease, outcome: Any, *, now: Any = None) -> None:
        return None

    async def no_renew(self: Ledger, lease: Lease, *, intent: Any = None, now: Any = None) -> None:
        return None  # no lease, so nothing to renew before a Run Command

    monkeypatch.setattr(Ledger, "acquire", no_lease)
    monkeypatch.setattr(Ledger, "release", no_release)
    monkeypatch.setattr(Ledger, "renew", no_renew)
    # Four copies of each item race; the busy ones fail at their first deferral (a 1 s deadline).
    config = chaos.replace(BROKEN, vms=4, latency_s=0.2, defer_deadline_h=0.0003)
    report = await chaos.run_chaos(config, azurite=shared_azurite)
    assert report["violations"]["concurrentRunCommands"] > 0


@pytest.mark.slow
async def test_the_checks_catch_an_audit_mode_that_acts(
    monkeypatch: pytest.MonkeyPatch, shared_azurite: Any
) -> None:
    loaded = Settings.from_env

    def enforce_always(env: Any = None) -> Settings:
        return loaded(env).with_mode(Mode.ENFORCE)

    monkeypatch.setattr(Settings, "from_env", staticmethod(enforce_always))
    report = await chaos.run_chaos(chaos.replace(BROKEN, audit_vms=6, dup_share=0.0), azurite=shared_azurite)
    assert report["violations"]["changedInAudit"] > 0


@pytest.mark.slow
async def test_the_checks_catch_a_lost_retry(monkeypatch: pytest.MonkeyPatch, shared_azurite: Any) -> None:
    from shared.workqueue import WorkQueue

    sent = WorkQueue.send

    async def drop_delayed(self: WorkQueue, item: Any, *, delay_s: float = 0.0) -> None:
        if delay_s <= 0:
            await sent(self, item, delay_s=delay_s)

    monkeypatch.setattr(WorkQueue, "send", drop_delayed)
    report = await chaos.run_chaos(
        chaos.replace(BROKEN, vms=6, mix={"avma_agent_not_ready": 1.0}, dup_share=0.0), azurite=shared_azurite
    )
    assert report["violations"]["lost"] > 0


@pytest.mark.slow
async def test_the_checks_catch_unreadable_output_reported_healthy(
    monkeypatch: pytest.MonkeyPatch, shared_azurite: Any
) -> None:
    """A workflow that calls output it cannot parse ``healthy``: AVMA VMs end recorded healthy."""
    from shared.model import Outcome, OutcomeKind
    from shared.workflow import Remediator

    def healthy(
        self: Remediator, vm_id: VmId, parsed: Outcome, stderr: str, *, phase: str = "detect"
    ) -> Outcome:
        return Outcome(str(vm_id), OutcomeKind.HEALTHY, "kms-client-licensed")

    monkeypatch.setattr(Remediator, "_bad_output", healthy)
    garbled = {"outputGarbled": {"every": 1}, "outputTruncated": {"every": 1}}
    # In audit mode, where the first Run Command only reads: in enforce mode it is a conditional
    # re-key (issue 12) that fixes these VMs before its output is read, so "healthy" would be true.
    report = await chaos.run_chaos(
        chaos.replace(BROKEN, audit_vms=6, dup_share=0.0, faults=garbled), azurite=shared_azurite
    )
    assert report["violations"]["verdict_vs_state"] > 0


@pytest.mark.slow
async def test_the_checks_catch_a_failed_operation_made_terminal_again(
    monkeypatch: pytest.MonkeyPatch, shared_azurite: Any
) -> None:
    """A workflow for which a Run Command operation that ended Failed is the end of it again
    (``failed: run-command-failed`` at once): licensed KMS clients end recorded failed."""
    import shared.workflow
    from shared.azure.compute import RunCommandOperationFailed

    terminal = tuple(e for e in shared.workflow._DEFERRING if e is not RunCommandOperationFailed)
    monkeypatch.setattr(shared.workflow, "_DEFERRING", terminal)
    failing = {"operationFailed": {"every": 2}}
    report = await chaos.run_chaos(
        chaos.replace(BROKEN, vms=6, mix={"kms_healthy": 1.0}, dup_share=0.0, faults=failing),
        azurite=shared_azurite,
    )
    assert report["violations"]["verdict_vs_state"] > 0
    [example, *_] = report["passes"]["enforce"]["examples"]["verdict_vs_state"]
    assert "a licensed KMS client, recorded failed: run-command-failed" in example
