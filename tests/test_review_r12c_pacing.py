"""Review r12c: the pacer against hostile answers, through the real SDK clients and the simulator.

A 429 may name a wait far longer than the engine sleeps inside one call: Compute's own sample is
``Retry-After: 1200`` ("Troubleshooting API throttling errors", MicrosoftDocs/SupportArticles-docs
``support/azure/virtual-machines/windows/troubleshooting-throttling-errors.md``). The 429 itself
becomes a ``throttled`` deferral (the retry policy does not sleep it); every later request of that
subscription and kind must too, at once, and not sit in the pacer until the call's deadline (a VM
read ending ``arm-timeout`` after ARM_CALL_TIMEOUT_SECONDS, a Run Command POST never sent ending
``run-command-timeout`` after RUN_COMMAND_TIMEOUT_SECONDS).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from shared.azure.compute import ComputeGateway, Throttled
from shared.azure.credentials import make_credential
from shared.azure.pacing import Pacer
from shared.guest.scripts import detect_command
from shared.model import VmId
from shared.settings import Settings
from simulator import Estate, Simulator
from tests.estates import windows_vm
from tests.test_throttle_pacing import FakeTime

SUB = "3f2c8a51-6b0e-4d7a-9c1e-2a5b7d9e4f10"
READS = "x-ms-ratelimit-remaining-subscription-reads"


def vm_id(name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}"


def _estate(throttling: dict[str, object], count: int = 3) -> Estate:
    vms = [windows_vm(vm_id(f"kms-{i:02}"), channel="KMS_CLIENT") for i in range(count)]
    return Estate.from_dict({"vms": vms, "throttling": throttling})


async def test_a_read_after_a_long_retry_after_is_deferred_at_once_not_timed_out(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read bucket of 1 refilled once every 100 s: the second read is ARM's 429 with a
    Retry-After of about 100 s (deferred); the third is deferred too, at once, with what is left of
    that wait, and never sent; not held in the pacer until ARM_CALL_TIMEOUT_SECONDS."""
    sim = sim_factory(_estate({"timeScale": 1, "reads": {"size": 1, "perSecond": 0.01}}), latency_s=0.01)
    env = {**sim.env(), "ARM_CALL_TIMEOUT_SECONDS": "4"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = Settings.from_env(env)
    ids = [VmId.parse(vm.id) for vm in sim.estate.vms]
    async with make_credential(config) as credential, ComputeGateway(credential, config) as gateway:
        await gateway.get_vm(ids[0])
        with pytest.raises(Throttled) as refused:
            await gateway.get_vm(ids[1])
        assert (refused.value.retry_after_s or 0) > 50
        started = time.monotonic()
        with pytest.raises(Throttled) as held:
            await gateway.get_vm(ids[2])
        elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert 50 < (held.value.retry_after_s or 0) <= (refused.value.retry_after_s or 0)
    assert sim.throttling()["arm"][SUB]["reads"]["requests"] == 2  # the held read never went


async def test_a_run_command_after_a_long_retry_after_is_throttled_not_a_run_command_timeout(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for writes: a Run Command POST held by an earlier 429's Retry-After is a
    ``throttled`` deferral at once; a ``run-command-timeout`` would say a command ran too long where
    none was sent."""
    sim = sim_factory(_estate({"timeScale": 1, "writes": {"size": 1, "perSecond": 0.01}}), latency_s=0.01)
    env = {**sim.env(), "RUN_COMMAND_TIMEOUT_SECONDS": "4", "POLL_INTERVAL_SECONDS": "0.05"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = Settings.from_env(env)
    ids = [VmId.parse(vm.id) for vm in sim.estate.vms]
    body = detect_command(config.kms_host, config.kms_port)
    async with make_credential(config) as credential, ComputeGateway(credential, config) as gateway:
        await gateway.run_command(ids[0], body)
        with pytest.raises(Throttled):
            await gateway.run_command(ids[1], body)
        started = time.monotonic()
        with pytest.raises(Throttled) as held:
            await gateway.run_command(ids[2], body)
        elapsed = time.monotonic() - started
    assert elapsed < 1.0 and (held.value.retry_after_s or 0) > 50
    assert sim.throttling()["arm"][SUB]["writes"]["requests"] == 2
    assert len(sim.run_logs()) == 1  # only the first command ran anywhere


@pytest.mark.parametrize("value", ["-1e300", "-5", "-inf", "nan", "inf"])
async def test_a_hostile_remaining_header_is_no_budget_to_wait_for(value: str) -> None:
    """A remaining-budget header ARM would never send (negative, infinite, not a number) neither
    holds the next request (a negative count is 0 left: one token's refill, 4/25 s with the
    reserve) nor lets the pacer forget what it knew."""
    fake = FakeTime()
    refused: list[float] = []

    def hold(subscription: str, kind: str, wait: float) -> Exception:
        refused.append(wait)
        return RuntimeError(f"held {wait}")

    pacer = Pacer(concurrency=4, clock=fake.clock, sleep=fake.sleep, max_wait_s=5.0, hold_error=hold)
    await pacer.before(SUB, "reads")
    pacer.after(SUB, "reads", 200, {READS: value})
    await pacer.before(SUB, "reads")
    assert refused == []
    assert sum(fake.slept) <= 4 / 25 + 1e-9
    assert all(math.isfinite(w) for w in fake.slept)
    assert pacer.remaining(SUB, "reads") in (None, 0.0)


async def test_a_hold_within_the_bound_is_slept_and_one_beyond_it_is_refused_with_what_is_left() -> None:
    fake = FakeTime()
    refusals: list[tuple[str, str, float]] = []

    def hold(subscription: str, kind: str, wait: float) -> Exception:
        refusals.append((subscription, kind, wait))
        return RuntimeError("held")

    pacer = Pacer(concurrency=4, clock=fake.clock, sleep=fake.sleep, max_wait_s=5.0, hold_error=hold)
    await pacer.before(SUB, "reads")
    pacer.after(SUB, "reads", 429, {READS: "240", "Retry-After": "3"})
    await pacer.before(SUB, "reads")  # 3 s: slept
    assert fake.slept == [pytest.approx(3.0)]
    pacer.after(SUB, "reads", 429, {READS: "240", "Retry-After": "1200"})
    fake.now += 100
    with pytest.raises(RuntimeError):
        await pacer.before(SUB, "reads")
    assert refusals == [(SUB, "reads", pytest.approx(1100.0))]
    assert fake.slept == [pytest.approx(3.0)]  # nothing slept for it
    await pacer.before(SUB, "writes")  # other kinds are not held
    fake.now += 1100
    await pacer.before(SUB, "reads")  # once the wait is over, requests go again


async def test_after_a_429_storm_the_subscription_gets_its_workers_back(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opening wave of eight reads meets Compute's policy (a bucket of 4, refilled fast): the
    subscription's concurrency halves. Answers that are not 429s then give the workers back: in
    the second half of the sweep eight Run Commands run at once again, not the four (or one) a
    halving that never recovers would leave."""
    from shared.azure.inventory import Inventory
    from shared.settings import Mode
    from shared.sweep import sweep_inventory
    from shared.workflow import Remediator
    from simulator.faults import FaultPlan

    plan = FaultPlan.from_dict({"armThrottling": {"timeScale": 1, "reads": {"size": 4, "perSecond": 400}}})
    sim = sim_factory(_estate({}, count=32).with_faults(plan), latency_s=0.15)
    env = {**sim.env(), "POLL_INTERVAL_SECONDS": "0.15", "MAX_CONCURRENCY": "8"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = Settings.from_env(env).with_mode(Mode.ENFORCE)
    async with (
        make_credential(config) as credential,
        ComputeGateway(credential, config) as gateway,
        Inventory(credential, config) as inventory,
    ):
        # The storm as the pacer meets it, first: a 429 of Compute's policy on the opening wave. The
        # live one depends on eight reads reaching a bucket of 4 within a few ms, which a loaded
        # machine's TLS handshakes spread out (no 429 at all in a fresh clone's `make test`).
        gateway.pacer.after(SUB.lower(), "reads", 429, {"Retry-After": "0"})
        assert gateway.pacer.concurrency(SUB) == 4
        report = await sweep_inventory(
            Remediator(gateway, config), inventory, concurrency=8, limit=gateway.pacer.concurrency
        )
    assert [o.kind.value for o in report.outcomes] == ["healthy"] * 32
    commands = sorted(
        (c["started"], c["ended"]) for log in sim.run_logs().values() for c in log if c.get("ended")
    )
    middle = commands[len(commands) // 2][0]
    late = [(s, e) for s, e in commands if s >= middle]
    most = max(sum(1 for s2, e2 in late if s2 <= s < e2) for s, _ in late)
    assert most >= 6


def _http_date(seconds_from_now: float) -> str:
    from email.utils import format_datetime

    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


@pytest.mark.parametrize(
    ("retry_after", "slept", "refused"),
    [
        ("0", 0.0, False),  # no hold (azure-core then backs off itself)
        ("-5", 0.0, False),  # a negative wait is none
        ("abc", 1.0, False),  # unreadable: the pacer's own second
        ("2.5", 2.5, False),
        ("http-date+3", 3.0, False),  # RFC 9110's other form
        ("1200", 0.0, True),  # Compute's sample: not slept, refused with the wait
        ("http-date+600", 0.0, True),
    ],
)
async def test_a_429s_retry_after_in_every_form_holds_the_next_request_as_long_and_no_longer(
    retry_after: str, slept: float, refused: bool
) -> None:
    fake = FakeTime()
    holds: list[float] = []

    def hold(subscription: str, kind: str, wait: float) -> Exception:
        holds.append(wait)
        return RuntimeError("held")

    pacer = Pacer(concurrency=4, clock=fake.clock, sleep=fake.sleep, max_wait_s=30.0, hold_error=hold)
    await pacer.before(SUB, "reads")
    value = (
        _http_date(float(retry_after.split("+")[1])) if retry_after.startswith("http-date") else retry_after
    )
    pacer.after(SUB, "reads", 429, {READS: "200", "Retry-After": value})
    if refused:
        with pytest.raises(RuntimeError):
            await pacer.before(SUB, "reads")
        assert holds and holds[0] > 30.0 and fake.slept == []
    else:
        await pacer.before(SUB, "reads")
        assert holds == [] and sum(fake.slept) == pytest.approx(
            slept, abs=1.01 if "date" in retry_after else 1e-6
        )


async def test_a_429_is_waited_for_once_by_the_retry_policy_and_the_pacer_together(
    sim_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read bucket of 1 refilled at 1/s: the second read is refused with a Retry-After of under a
    second. azure-core's retry policy sleeps it and retries; the pacer, which holds the subscription
    for the same Retry-After, lets that retry go at once: one wait, not two in a row."""
    sim = sim_factory(_estate({"timeScale": 1, "reads": {"size": 1, "perSecond": 1}}), latency_s=0.01)
    for key, value in sim.env().items():
        monkeypatch.setenv(key, value)
    config = Settings.from_env(sim.env())
    ids = [VmId.parse(vm.id) for vm in sim.estate.vms]
    async with make_credential(config) as credential, ComputeGateway(credential, config) as gateway:
        await gateway.get_vm(ids[0])
        started = time.monotonic()
        await gateway.get_vm(ids[1])
        elapsed = time.monotonic() - started
        throttled = gateway.pacer.throttled[SUB]
    assert throttled == 1 and sim.throttling()["arm"][SUB]["reads"] == {"requests": 3, "throttled": 1}
    assert 0.8 <= elapsed < 1.4  # the bucket's second, once


@pytest.mark.parametrize(
    ("headers", "slept"),
    [
        ({"retry-after-ms": "2500"}, 2.5),
        ({"x-ms-retry-after-ms": "1500"}, 1.5),
        ({"Retry-After": "2", "retry-after-ms": "9000"}, 2.0),  # Retry-After first, as azure-core reads it
        ({"retry-after-ms": "nan"}, 1.0),  # no wait named: the pacer's own second
    ],
)
async def test_a_429_naming_its_wait_in_milliseconds_holds_the_pacer_that_long(
    headers: dict[str, str], slept: float
) -> None:
    """The pacer reads the wait as the worker's deferral does (``wait_from_headers``): before, a 429 with
    only ``retry-after-ms`` held the subscription for the pacer's default second."""
    fake = FakeTime()
    pacer = Pacer(concurrency=4, clock=fake.clock, sleep=fake.sleep, max_wait_s=30.0)
    await pacer.before(SUB, "reads")
    pacer.after(SUB, "reads", 429, {READS: "200", **headers})
    await pacer.before(SUB, "reads")
    assert sum(fake.slept) == pytest.approx(slept, abs=1e-6)
