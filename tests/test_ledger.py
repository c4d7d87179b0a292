"""The ledger against a real Azurite: leases under contention, verdicts, history and queries.

Each test gets its own table, so tests never see each other's rows.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.clouds import CLOUDS
from shared.ledger import LeaseLost, Ledger, LedgerError, target_key
from shared.model import Outcome, OutcomeKind, VmId
from shared.settings import Settings
from tests.azurite import connection_string

SUB = "00000000-0000-0000-0000-0000000000aa"
T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def vm(name: str, rg: str = "rg-app") -> VmId:
    return VmId.parse(
        f"/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"
    )


def outcome(vm_id: VmId, kind: OutcomeKind, reason: str = "", **details: Any) -> Outcome:
    return Outcome(str(vm_id), kind, reason, hint=f"hint for {kind.value}", details=details)


@pytest.fixture
def settings(azurite: Any) -> Settings:
    return Settings(
        cloud=CLOUDS["AzureCloud"],
        storage_connection=azurite.connection_string,
        ledger_table="t" + uuid.uuid4().hex[:12],
    )


@pytest.fixture
async def open_ledger(settings: Settings) -> AsyncIterator[Callable[[], Ledger]]:
    """Open Ledger instances on the test's table (one per simulated worker); all closed after."""
    opened: list[Ledger] = []

    def make() -> Ledger:
        opened.append(Ledger.from_settings(settings))
        return opened[-1]

    await make().create_table_if_needed()
    yield make
    for ledger in opened:
        await ledger.close()


@pytest.fixture
def ledger(open_ledger: Callable[[], Ledger]) -> Ledger:
    return open_ledger()


async def settle(ledger: Ledger, vm_id: VmId, kind: OutcomeKind, at: datetime, reason: str = "") -> None:
    """One complete workflow run: lease, verdict, release."""
    lease = await ledger.acquire(vm_id, owner="w", now=at)
    assert lease is not None
    await ledger.release(lease, outcome(vm_id, kind, reason), now=at)


# ---------------------------------------------------------------------------------------- lease


async def test_a_held_lease_blocks_others_until_released(ledger: Ledger, settings: Settings) -> None:
    a = await ledger.acquire(vm("vm1"), owner="worker-a", now=T0)
    assert a is not None
    assert a.previous is None
    assert a.expires_at == T0 + timedelta(seconds=settings.lease_s)
    assert await ledger.acquire(vm("vm1"), owner="worker-b", now=T0 + timedelta(seconds=1)) is None
    # The same owner does not re-enter: two deliveries handled by one host are still two.
    assert await ledger.acquire(vm("vm1"), owner="worker-a", now=T0 + timedelta(seconds=1)) is None
    # Another VM is independent.
    assert await ledger.acquire(vm("vm2"), owner="worker-b", now=T0) is not None

    await ledger.release(a, None, now=T0 + timedelta(seconds=2))
    b = await ledger.acquire(vm("vm1"), owner="worker-b", now=T0 + timedelta(seconds=3))
    assert b is not None
    assert b.previous is None  # released without a verdict


async def test_an_expired_lease_is_taken_over_and_its_old_holder_cannot_free_or_renew_it(
    ledger: Ledger, settings: Settings
) -> None:
    lease_s = timedelta(seconds=settings.lease_s)
    stale = await ledger.acquire(vm("vm1"), owner="worker-a", now=T0)
    assert stale is not None
    assert await ledger.acquire(vm("vm1"), owner="worker-b", now=T0 + lease_s - timedelta(seconds=1)) is None

    fresh = await ledger.acquire(vm("vm1"), owner="worker-b", now=T0 + lease_s + timedelta(seconds=1))
    assert fresh is not None

    # The old holder wakes up: its ETag is stale, so it frees nothing and stores no verdict.
    await ledger.release(stale, outcome(vm("vm1"), OutcomeKind.REMEDIATED), now=T0 + lease_s)
    assert await ledger.acquire(vm("vm1"), owner="worker-c", now=T0 + lease_s + timedelta(seconds=2)) is None
    assert await ledger.last_verdict(vm("vm1")) is None
    with pytest.raises(LeaseLost):
        await ledger.renew(stale, now=T0 + lease_s)

    # The new holder still owns it, can renew it past its first expiry, and release it.
    await ledger.renew(fresh, now=T0 + 2 * lease_s)
    assert fresh.expires_at == T0 + 3 * lease_s
    late = T0 + 2 * lease_s + timedelta(seconds=5)  # after the first expiry, before the renewed one
    assert await ledger.acquire(vm("vm1"), owner="worker-c", now=late) is None
    await ledger.release(fresh, outcome(vm("vm1"), OutcomeKind.HEALTHY), now=late)
    verdict = await ledger.last_verdict(vm("vm1"))
    assert verdict is not None
    assert verdict.outcome is OutcomeKind.HEALTHY
    assert await ledger.acquire(vm("vm1"), owner="worker-c", now=late) is not None


async def test_release_is_idempotent(ledger: Ledger) -> None:
    lease = await ledger.acquire(vm("vm1"), owner="a", now=T0)
    assert lease is not None
    await ledger.release(lease, outcome(vm("vm1"), OutcomeKind.HEALTHY), now=T0)
    other = await ledger.acquire(vm("vm1"), owner="b", now=T0 + timedelta(seconds=1))
    assert other is not None
    await ledger.release(lease, None)  # a second release must not touch b's lease
    assert await ledger.acquire(vm("vm1"), owner="c", now=T0 + timedelta(seconds=2)) is None
    verdict = await ledger.last_verdict(vm("vm1"))
    assert verdict is not None
    assert verdict.runs == 1


@pytest.mark.parametrize("existing_row", [False, True], ids=["create-race", "etag-race"])
async def test_ten_workers_racing_for_one_vm_get_exactly_one_lease(
    open_ledger: Callable[[], Ledger], existing_row: bool
) -> None:
    workers = [open_ledger() for _ in range(10)]
    if existing_row:  # a free, previously used row: the race is decided by ETag (412), not by 409
        await settle(workers[0], vm("vm1"), OutcomeKind.HEALTHY, T0 - timedelta(hours=1))
    leases = await asyncio.gather(
        *(w.acquire(vm("vm1"), owner=f"worker-{i}", now=T0) for i, w in enumerate(workers))
    )
    winners = [lease for lease in leases if lease is not None]
    assert len(winners) == 1
    assert winners[0].owner.startswith("worker-")


async def test_contending_workers_never_hold_one_vm_at_the_same_time(
    open_ledger: Callable[[], Ledger],
) -> None:
    """Duplicate deliveries racing repeatedly: acquire, 'run', release, again, never two at once."""
    workers = [open_ledger() for _ in range(6)]
    holding: set[str] = set()
    overlaps: list[set[str]] = []
    runs = 0

    async def worker(ledger: Ledger, name: str) -> None:
        nonlocal runs
        for _ in range(8):
            lease = await ledger.acquire(vm("vm1"), owner=name)
            if lease is None:
                await asyncio.sleep(0.002)
                continue
            holding.add(name)
            if len(holding) > 1:
                overlaps.append(set(holding))
            runs += 1
            await asyncio.sleep(0.005)  # the "Run Command"
            holding.discard(name)
            await ledger.release(lease, outcome(vm("vm1"), OutcomeKind.HEALTHY))

    await asyncio.gather(*(worker(w, f"w{i}") for i, w in enumerate(workers)))
    assert overlaps == []
    assert runs >= 2  # the lease was released and re-taken, so the check above saw contention
    verdict = await workers[0].last_verdict(vm("vm1"))
    assert verdict is not None
    assert verdict.runs == runs  # every release of a held lease stored its verdict


async def test_vm_ids_that_differ_only_in_case_share_one_row(ledger: Ledger) -> None:
    upper = vm("WEB-01", rg="RG-App")
    lower = VmId.parse(str(upper).lower())
    lease = await ledger.acquire(upper, owner="a", now=T0)
    assert lease is not None
    assert await ledger.acquire(lower, owner="b", now=T0) is None
    await ledger.release(lease, outcome(upper, OutcomeKind.HEALTHY), now=T0)
    await ledger.record(
        lower, outcome=outcome(lower, OutcomeKind.HEALTHY), trigger="sweep", correlation_id="c1", attempt=0
    )

    verdict = await ledger.last_verdict(lower)
    assert verdict is not None
    assert verdict.outcome is OutcomeKind.HEALTHY
    assert len(await ledger.history(upper)) == 1
    assert len(await ledger.history(str(upper).upper())) == 1  # the id as text, any case
    assert await ledger.verified_since(T0) == {upper}
    assert (await ledger.status())["vms"] == 1


# ------------------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("kind", list(OutcomeKind), ids=[k.value for k in OutcomeKind])
async def test_verdict_records_verified_at_only_when_the_vm_was_observed(
    ledger: Ledger, kind: OutcomeKind
) -> None:
    await settle(ledger, vm("vm1"), kind, T0, reason="some-reason")
    verdict = await ledger.last_verdict(vm("vm1"))
    assert verdict is not None
    assert (verdict.outcome, verdict.reason, verdict.hint) == (kind, "some-reason", f"hint for {kind.value}")
    assert verdict.decided_at == T0
    assert verdict.verified_at == (None if kind is OutcomeKind.DEFERRED else T0)
    assert verdict.runs == 1


async def test_verdict_history_of_one_vm_counts_runs_and_streaks(ledger: Ledger) -> None:
    t = [T0 + timedelta(minutes=10 * i) for i in range(5)]
    await settle(ledger, vm("vm1"), OutcomeKind.HEALTHY, t[0])
    await settle(ledger, vm("vm1"), OutcomeKind.DEFERRED, t[1], "agent-not-ready")
    await settle(ledger, vm("vm1"), OutcomeKind.DEFERRED, t[2], "agent-not-ready")
    verdict = await ledger.last_verdict(vm("vm1"))
    assert verdict is not None
    assert verdict.outcome is OutcomeKind.DEFERRED
    assert verdict.verified_at == t[0]  # a deferral observed nothing: the last observation stands
    assert (verdict.runs, verdict.consecutive_deferrals, verdict.consecutive_failures) == (3, 2, 0)

    await settle(ledger, vm("vm1"), OutcomeKind.FAILED, t[3], "activation-error:0xC004F074")
    await settle(ledger, vm("vm1"), OutcomeKind.REMEDIATED, t[4])
    verdict = await ledger.last_verdict(vm("vm1"))
    assert verdict is not None
    assert (verdict.outcome, verdict.reason, verdict.verified_at) == (OutcomeKind.REMEDIATED, "", t[4])
    assert (verdict.runs, verdict.consecutive_deferrals, verdict.consecutive_failures) == (5, 0, 0)


async def test_verified_since_lists_only_vms_observed_after_the_cutoff(ledger: Ledger) -> None:
    now = T0 + timedelta(days=2)
    await settle(ledger, vm("recent"), OutcomeKind.HEALTHY, now - timedelta(hours=2))
    await settle(
        ledger, vm("failed"), OutcomeKind.FAILED, now - timedelta(hours=3), "activation-error:0xC004F074"
    )
    await settle(ledger, vm("old"), OutcomeKind.HEALTHY, now - timedelta(hours=30))
    await settle(ledger, vm("deferred"), OutcomeKind.DEFERRED, now - timedelta(hours=1), "agent-not-ready")
    assert await ledger.acquire(vm("leased"), owner="w", now=now) is not None  # no verdict yet
    assert await ledger.last_verdict(vm("leased")) is None

    assert await ledger.verified_since(now - timedelta(hours=24)) == {vm("recent"), vm("failed")}
    assert await ledger.verified_since(now - timedelta(hours=48)) == {vm("recent"), vm("failed"), vm("old")}
    assert await ledger.verified_since(now) == set()
    # The boundary is inclusive: verified exactly at the cutoff is "not older than" it.
    assert await ledger.verified_since(now - timedelta(hours=2)) == {vm("recent")}


# -------------------------------------------------------------------------------------- history


async def test_history_is_append_only_and_newest_first(ledger: Ledger) -> None:
    for i, kind in enumerate([OutcomeKind.DEFERRED, OutcomeKind.REMEDIATED, OutcomeKind.REMEDIATED]):
        await ledger.record(
            vm("vm1"),
            outcome=outcome(vm("vm1"), kind, f"r{i}", step=i),
            trigger="vm-created",
            correlation_id=f"corr-{i}",
            attempt=i,
            now=T0 + timedelta(seconds=i),
        )
    # Ten writes with no explicit time, started within microseconds of each other (as concurrent
    # tasks of one worker would): ten rows, in the order they were started.
    await asyncio.gather(
        *(
            ledger.record(
                vm("vm1"),
                outcome=outcome(vm("vm1"), OutcomeKind.HEALTHY, "x"),
                trigger="sweep",
                correlation_id=f"now-{i}",
                attempt=0,
            )
            for i in range(10)
        )
    )

    rows = await ledger.history(vm("vm1"))
    assert [r["correlationId"] for r in rows] == [f"now-{i}" for i in reversed(range(10))] + [
        "corr-2",
        "corr-1",
        "corr-0",
    ]
    newest_timed = rows[10]
    assert newest_timed == {
        "at": (T0 + timedelta(seconds=2)).isoformat(),
        "target": str(vm("vm1")),
        "entry": "outcome",
        "outcome": "remediated",
        "reason": "r2",
        "hint": "hint for remediated",
        "details": {"step": 2},
        "trigger": "vm-created",
        "correlationId": "corr-2",
        "attempt": 2,
    }
    assert [r["correlationId"] for r in await ledger.history(vm("vm1"), limit=2)] == ["now-9", "now-8"]
    assert await ledger.history(vm("other")) == []


async def test_oversized_details_are_capped_but_stay_json(ledger: Ledger) -> None:
    big = {"output": "x" * 100_000, "when": T0}
    await ledger.record(
        vm("vm1"),
        outcome=outcome(vm("vm1"), OutcomeKind.FAILED, "r", **big),
        trigger="alert",
        correlation_id="c",
        attempt=1,
    )
    [row] = await ledger.history(vm("vm1"))
    assert row["details"]["truncated"] is True
    assert row["details"]["chars"] > 100_000
    assert len(row["details"]["head"]) <= 8000


@pytest.mark.parametrize(
    "target",
    [
        "computer:WEB01",
        "unparsable-message",
        "",
        "/subscriptions/not-a-guid/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/x",
        "a/b\\c#d?e\x00\x1f\x7f 'quoted' %41 !21 ünïcode",
        "z" * 5000,
    ],
    ids=["computer", "word", "empty", "bad-id", "forbidden-chars", "huge"],
)
async def test_record_event_with_any_target_is_never_lost(ledger: Ledger, target: str) -> None:
    await ledger.record_event(
        target, "failed", "poison", trigger="queue", correlation_id="corr-p", details={"dequeueCount": 5}
    )
    [row] = await ledger.history(target)
    assert (row["entry"], row["outcome"], row["reason"], row["correlationId"]) == (
        "event",
        "failed",
        "poison",
        "corr-p",
    )
    assert row["details"] == {"dequeueCount": 5}
    assert row["target"] == target[:999] + ("…" if len(target) > 1000 else "")
    assert (await ledger.status(recent=1))["recent"][0]["reason"] == "poison"


def test_target_keys_are_distinct_and_valid() -> None:
    targets = ["a/b", "a!2fb", "a%2fb", "A/B", "computer:x", "computer!3ax", "z" * 5000, "z" * 4999 + "y"]
    keys = [target_key(t) for t in targets]
    assert keys[0] == keys[3]  # case-insensitive, like ARM
    assert len({keys[i] for i in (0, 1, 2, 4, 5, 6, 7)}) == 7
    for key in keys:
        assert len(key) <= 400
        assert not any(ch in key for ch in "/\\#?") and all(0x20 <= ord(ch) < 0x7F for ch in key)
    assert target_key(str(vm("Web-01"))) == target_key(vm("web-01")) == f"{SUB}|rg-app|web-01"


# --------------------------------------------------------------------------------------- status


async def test_status_counts_last_verdicts_and_lists_the_newest_actions(ledger: Ledger) -> None:
    await settle(ledger, vm("a"), OutcomeKind.DEFERRED, T0)
    await settle(ledger, vm("a"), OutcomeKind.REMEDIATED, T0 + timedelta(minutes=5))  # only the last counts
    await settle(ledger, vm("b"), OutcomeKind.HEALTHY, T0)
    await settle(ledger, vm("c"), OutcomeKind.HEALTHY, T0)
    await settle(ledger, vm("d"), OutcomeKind.FAILED, T0, "activation-error:0xC004F074")
    assert await ledger.acquire(vm("e"), owner="w", now=T0) is not None  # in progress, no verdict yet

    # History across a day boundary: the newest day's rows come first, newest first inside a day.
    day1, day2 = T0 - timedelta(days=1), T0
    for i, at in enumerate([day1, day1 + timedelta(hours=1), day2, day2 + timedelta(hours=1)]):
        await ledger.record(
            vm("a"),
            outcome=outcome(vm("a"), OutcomeKind.HEALTHY),
            trigger="sweep",
            correlation_id=f"c{i}",
            attempt=0,
            now=at,
        )
    await ledger.record_event("computer:lost", "skipped", "not-found", now=day1 - timedelta(hours=5))

    status = await ledger.status(recent=3, now=T0 + timedelta(minutes=10))
    assert status["counts"] == {
        "healthy": 2,
        "remediated": 1,
        "would-remediate": 0,
        "skipped": 0,
        "deferred": 0,
        "failed": 1,
    }
    assert (status["vms"], status["inProgress"]) == (5, 1)
    assert [r["correlationId"] for r in status["recent"]] == ["c3", "c2", "c1"]
    everything = await ledger.status(recent=50, now=T0 + timedelta(minutes=10))
    assert [r["correlationId"] for r in everything["recent"]] == ["c3", "c2", "c1", "c0", ""]
    assert (await ledger.status(recent=0))["recent"] == []


# --------------------------------------------------------------------------------------- errors


async def test_storage_failures_raise_ledger_error(azurite: Any) -> None:
    settings = Settings(
        cloud=CLOUDS["AzureCloud"],
        storage_connection=connection_string(
            azurite.blob_port, azurite.queue_port, 9
        ),  # nothing listens on 9
        ledger_table="tunreachable",
    )
    async with Ledger.from_settings(settings, retry_total=0) as ledger:
        with pytest.raises(LedgerError, match="acquire failed"):
            await ledger.acquire(vm("vm1"), owner="w")
        with pytest.raises(LedgerError, match="record failed"):
            await ledger.record_event("computer:x", "failed", "poison")


async def test_a_missing_table_is_a_ledger_error_not_a_silent_none(azurite: Any) -> None:
    """Reading "no row" from a table that is not there would let every VM through unleased."""
    settings = Settings(
        cloud=CLOUDS["AzureCloud"], storage_connection=azurite.connection_string, ledger_table="tnosuchtable"
    )
    async with Ledger.from_settings(settings, retry_total=0) as ledger:
        with pytest.raises(LedgerError, match="does not exist"):
            await ledger.last_verdict(vm("vm1"))
        with pytest.raises(LedgerError, match="does not exist"):
            await ledger.acquire(vm("vm1"), owner="w")


def test_no_storage_configured_is_a_clear_error() -> None:
    with pytest.raises(LedgerError, match="AzureWebJobsStorage"):
        Ledger.from_settings(Settings(cloud=CLOUDS["AzureCloud"]))


async def test_the_ledger_recovers_after_azurite_restarts(restartable_azurite: Any) -> None:
    """Stale pooled connections after a storage outage must not wedge a long-lived worker.

    Uses a private Azurite: restarting the session's one would wipe other tests' queues and tables.
    """
    private = restartable_azurite
    settings = Settings(
        cloud=CLOUDS["AzureCloud"], storage_connection=private.connection_string, ledger_table="tchaos"
    )
    async with Ledger.from_settings(settings) as ledger:
        await ledger.create_table_if_needed()
        assert await ledger.acquire(vm("vm1"), owner="w", now=T0) is not None
        private.restart()  # in memory: the table is gone too
        with pytest.raises(LedgerError, match="does not exist"):
            await ledger.acquire(vm("vm1"), owner="w", now=T0)
        await ledger.create_table_if_needed()
        assert await ledger.acquire(vm("vm1"), owner="w", now=T0) is not None


async def test_a_verdict_keeps_the_os_disk_it_was_reached_on_and_an_interrupted_intent_is_seen(
    ledger: Ledger,
) -> None:
    disk = f"/subscriptions/{SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/disks/vm1_OsDisk_1"
    lease = await ledger.acquire(vm("vm1"), owner="w", now=T0)
    assert lease is not None
    await ledger.release(
        lease, outcome(vm("vm1"), OutcomeKind.HEALTHY, "kms-licensed", osDiskId=disk), now=T0
    )
    stored = await ledger.last_verdict(vm("vm1"))
    assert stored is not None and stored.os_disk_id == disk  # issue 9: recorded with each verdict

    # A holder announces a remediation and dies: the next holder is told, whatever the verdict says.
    dying = await ledger.acquire(vm("vm1"), owner="w1", now=T0 + timedelta(hours=1))
    assert dying is not None and dying.interrupted is None
    await ledger.renew(dying, intent={"phase": "remediate"}, now=T0 + timedelta(hours=1))
    later = T0 + timedelta(hours=3)  # its lease has run out
    next_holder = await ledger.acquire(vm("vm1"), owner="w2", now=later)
    assert next_holder is not None
    assert next_holder.interrupted is not None and next_holder.interrupted["phase"] == "remediate"
    await ledger.release(next_holder, outcome(vm("vm1"), OutcomeKind.HEALTHY), now=later)
    after = await ledger.acquire(vm("vm1"), owner="w3", now=later + timedelta(seconds=1))
    assert after is not None and after.interrupted is None  # a verdict closes the intent
