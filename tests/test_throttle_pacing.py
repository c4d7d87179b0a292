"""The engine spends ARM's budget well: paced from the remaining-budget headers, adapting after a
429, and never polling a Run Command before the service's ``Retry-After``.

The pacer's arithmetic on a fake clock; the policy and the poller through the real SDK against
the simulator with ARM's budgets on (simulator/throttle.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from shared.azure.compute import ComputeGateway
from shared.azure.credentials import make_credential
from shared.azure.pacing import Pacer, operation_kind, subscription_of
from shared.guest.scripts import detect_command
from shared.model import VmId
from shared.settings import Settings
from simulator import Estate, Simulator
from tests.estates import windows_vm

SUB = "3f2c8a51-6b0e-4d7a-9c1e-2a5b7d9e4f10"
OTHER = "9a0b1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d"
READS = "x-ms-ratelimit-remaining-subscription-reads"


def vm_id(name: str, sub: str = SUB) -> str:
    return f"/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}"


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_requests_are_classified_by_subscription_and_kind() -> None:
    assert subscription_of(f"https://management.azure.com{vm_id('a')}?api-version=1") == SUB
    assert subscription_of("https://management.azure.com/subscriptions?api-version=1") is None
    assert subscription_of("https://management.azure.com/providers/Microsoft.ResourceGraph/resources") is None
    assert [operation_kind(m) for m in ("GET", "head", "POST", "PUT", "PATCH", "DELETE")] == [
        "reads",
        "reads",
        "writes",
        "writes",
        "writes",
        "deletes",
    ]


async def test_the_pacer_waits_for_the_refill_once_the_budget_runs_low() -> None:
    fake = FakeTime()
    pacer = Pacer(concurrency=8, reserve=3, clock=fake.clock, sleep=fake.sleep)
    await pacer.before(SUB, "reads")  # nothing known yet: it goes
    pacer.after(SUB, "reads", 200, {READS: "10"})
    for _ in range(7):  # 10 left, 7 sent: 3 would be left, the reserve
        await pacer.before(SUB, "reads")
    assert fake.slept == []
    await pacer.before(SUB, "reads")  # one more would dip into the reserve: wait for one token
    assert fake.slept == [pytest.approx(1 / 25)]
    await pacer.before(OTHER, "reads")  # another subscription has its own budget
    await pacer.before(SUB, "writes")  # and writes are another bucket
    assert len(fake.slept) == 1


async def test_a_429_holds_the_subscription_until_retry_after_and_halves_its_concurrency() -> None:
    fake = FakeTime()
    pacer = Pacer(concurrency=16, clock=fake.clock, sleep=fake.sleep)
    await pacer.before(SUB, "reads")
    pacer.after(SUB, "reads", 429, {READS: "0", "Retry-After": "2.5"})
    assert pacer.throttled[SUB] == 1 and pacer.concurrency(SUB) == 8
    await pacer.before(SUB, "reads")
    assert fake.slept and fake.slept[0] == pytest.approx(2.5)  # not before Retry-After
    assert pacer.concurrency(OTHER) == 16  # other subscriptions keep their workers
    # A burst of 429s at once halves once; later ones halve again.
    pacer.after(SUB, "reads", 429, {READS: "0", "Retry-After": "0.1"})
    assert pacer.concurrency(SUB) == 4
    pacer.after(SUB, "reads", 429, {READS: "0", "Retry-After": "0.1"})
    assert pacer.concurrency(SUB) == 4  # within the cooldown
    # Answers that are not 429s give workers back, one per round of the limit.
    for _ in range(40):
        pacer.after(SUB, "reads", 200, {READS: "200"})
    assert 8 <= pacer.concurrency(SUB) < 16


async def test_after_a_429_the_assumed_refill_is_halved_then_recovers() -> None:
    fake = FakeTime()
    pacer = Pacer(concurrency=4, reserve=1, clock=fake.clock, sleep=fake.sleep)
    pacer.after(SUB, "reads", 429, {READS: "0", "Retry-After": "0"})
    fake.now += 1
    pacer.after(SUB, "reads", 200, {READS: "0"})
    await pacer.before(SUB, "reads")
    # Two tokens (the request's and the reserve's) at the halved rate: 12.5/s, plus a hundredth of
    # the documented 25/s for the answer that was not a 429.
    assert fake.slept[-1] == pytest.approx(2 / 12.75)


def _estate(throttling: dict[str, object], count: int = 12) -> Estate:
    vms = [windows_vm(vm_id(f"kms-{i:02}"), channel="KMS_CLIENT") for i in range(count)]
    return Estate.from_dict({"vms": vms, "throttling": throttling})


async def test_a_steady_run_spends_the_refill_and_gets_no_429(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read bucket of 6 refilled at ARM's documented 25/s in wall-clock seconds: 30 reads, four at
    a time, take the refill's time and are never refused."""
    sim = sim_factory(_estate({"timeScale": 1, "reads": {"size": 6, "perSecond": 25}}), latency_s=0.01)
    for key, value in sim.env().items():
        monkeypatch.setenv(key, value)
    config = Settings.from_env(sim.env())
    ids = [VmId.parse(vm.id) for vm in sim.estate.vms]
    started = time.monotonic()
    async with make_credential(config) as credential, ComputeGateway(credential, config) as gateway:
        gate = asyncio.Semaphore(4)

        async def read(vm: VmId) -> None:
            async with gate:
                await gateway.get_vm(vm)

        await asyncio.gather(*(read(ids[i % len(ids)]) for i in range(30)))
        pacer = gateway.pacer
    elapsed = time.monotonic() - started
    assert sim.throttling()["armThrottled"] == 0 and sum(pacer.throttled.values()) == 0
    assert elapsed >= (30 - 6) / 25 * 0.9  # the refill's pace, not a burst
    assert pacer.waited_s > 0


async def test_the_first_status_poll_waits_for_the_services_retry_after(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 202 of a Run Command says ``Retry-After: 1`` (a 1 s command): one status poll after a
    second, then the result; not a poll right away, and not the 30 s polling interval either."""
    sim = sim_factory(_estate({}, count=1), latency_s=1.0)
    env = {**sim.env(), "POLL_INTERVAL_SECONDS": "30"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = Settings.from_env(env)
    async with make_credential(config) as credential, ComputeGateway(credential, config) as gateway:
        started = time.monotonic()
        out, _ = await gateway.run_command(
            VmId.parse(sim.estate.vms[0].id), detect_command(config.kms_host, config.kms_port)
        )
        elapsed = time.monotonic() - started
        requests = gateway.requests
    assert "AVMA-REMEDIATOR-RESULT" in out
    assert sim.counters()["requests"]["operation"] == 2  # the status poll and the result
    assert requests == 3  # the POST, the poll, the result
    assert 1.0 <= elapsed < 5.0


async def test_a_healthy_vm_costs_four_arm_requests_and_its_listing_almost_none(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per licensed VM: its read, the detection's POST, one status poll and the result; the listing
    is Resource Graph's (one query here), not ARM's."""
    from shared.azure.inventory import Inventory
    from shared.settings import Mode
    from shared.sweep import sweep_inventory
    from shared.workflow import Remediator

    sim = sim_factory(_estate({}, count=8), latency_s=0.2)
    env = {**sim.env(), "POLL_INTERVAL_SECONDS": "0.25"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = Settings.from_env(env).with_mode(Mode.ENFORCE)
    async with (
        make_credential(config) as credential,
        ComputeGateway(credential, config) as gateway,
        Inventory(credential, config) as inventory,
    ):
        report = await sweep_inventory(
            Remediator(gateway, config), inventory, concurrency=8, limit=gateway.pacer.concurrency
        )
        requests = gateway.requests
    assert [o.kind.value for o in report.outcomes] == ["healthy"] * 8
    assert requests == 4 * 8
    assert [q["kind"] for q in sim.graph_queries()] == ["subscriptions", "list_vms"]


_PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


async def test_sessions_trust_the_environment_only_when_it_names_a_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``trust_env`` on, aiohttp reads ``~/.netrc`` and the proxy variables in a thread for every
    request; it is on only when a proxy is configured, and then the proxy is used."""
    from shared.azure.transport import tls_session

    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    config = Settings.from_env({})
    session = tls_session(config)
    try:
        assert session.trust_env is False
    finally:
        await session.close()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.contoso.example:3128")
    session = tls_session(config)
    try:
        assert session.trust_env is True
    finally:
        await session.close()


async def test_computes_own_throttle_is_met_and_backed_off_from_though_the_budget_looked_full(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compute's per-minute policy (the armThrottling fault: a LowCostGet3Min bucket of 3 here)
    shows nowhere in ARM's subscription headers, so the pacer cannot foresee it: eight reads at
    once meet its 429s, and the engine backs off (Retry-After, the subscription's concurrency
    halved) and every read ends well."""
    from simulator.faults import FaultPlan

    plan = FaultPlan.from_dict({"armThrottling": {"timeScale": 1, "reads": {"size": 3, "perSecond": 10}}})
    sim = sim_factory(_estate({}, count=8).with_faults(plan), latency_s=0.01)
    for key, value in sim.env().items():
        monkeypatch.setenv(key, value)
    config = Settings.from_env(sim.env())
    ids = [VmId.parse(vm.id) for vm in sim.estate.vms]
    async with make_credential(config) as credential, ComputeGateway(credential, config) as gateway:
        facts = await asyncio.gather(*(gateway.get_vm(vm) for vm in ids))
        pacer = gateway.pacer
        assert (pacer.remaining(SUB, "reads") or 0) >= 200  # ARM's budget said: plenty left
    assert [f.vm_id for f in facts] == ids
    assert sim.faults()["armThrottling"] >= 1 and sim.throttling()["armThrottled"] == 0
    assert pacer.throttled[SUB] == sim.faults()["armThrottling"]  # every 429 seen by the pacer
    assert pacer.provider_throttled[SUB] >= 1  # told apart from ARM's: its budget was not low
    assert pacer.concurrency(SUB) < config.max_concurrency  # and the subscription slowed down


async def test_a_providers_429_spaces_the_requests_an_arms_does_not() -> None:
    """A 429 with ARM's budget plenty is the resource provider's (troubleshooting-throttling-errors.md):
    requests of that subscription and kind are then spaced by the Retry-After it named, once per
    burst, doubled by a later burst, shorter by a tenth per answer that is not a 429. A 429 with
    ARM's budget empty is ARM's: no spacing."""
    fake = FakeTime()
    pacer = Pacer(concurrency=8, clock=fake.clock, sleep=fake.sleep)
    for _ in range(4):
        await pacer.before(SUB, "reads")
    pacer.after(SUB, "reads", 429, {READS: "240", "Retry-After": "0.5"})
    pacer.after(SUB, "reads", 429, {READS: "239", "Retry-After": "0.2"})  # the same burst
    assert pacer.spacing(SUB, "reads") == 0.5 and pacer.provider_throttled[SUB] == 1
    pacer.after(SUB, "reads", 200, {READS: "238"})
    pacer.after(SUB, "reads", 200, {READS: "237"})
    assert pacer.spacing(SUB, "reads") == pytest.approx(0.405)
    for _ in range(3):
        await pacer.before(SUB, "reads")  # the first after Retry-After, then one per spacing
    assert fake.now == pytest.approx(100.5 + 2 * 0.405)
    pacer.after(SUB, "reads", 429, {READS: "236", "Retry-After": "0.1"})  # a later burst
    assert pacer.spacing(SUB, "reads") == pytest.approx(0.81) and pacer.provider_throttled[SUB] == 2
    fake.now += 1
    pacer.after(SUB, "reads", 429, {READS: "235", "Retry-After": "1200"})  # a thirty-minute policy's
    assert pacer.spacing(SUB, "reads") == 1.0  # at most a second apart once the 1,200 s are over
    await pacer.before(SUB, "writes")
    pacer.after(SUB, "writes", 429, {"x-ms-ratelimit-remaining-subscription-writes": "0", "Retry-After": "1"})
    assert pacer.spacing(SUB, "writes") is None and pacer.provider_throttled[SUB] == 3
