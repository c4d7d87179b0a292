"""A Table outage longer than the host's retries (issue 9, item 7's last gap).

Against the real function code (``shared.triggers.work``), Azurite and the simulator. The Functions
host moves a message to the poison queue after ``maxDequeueCount`` failed deliveries (host.json: 5,
one ``visibilityTimeout`` apart), so an outage of a few minutes used to end every item in flight
``failed: poison``. The worker now carries such an item on as a fresh copy (its own dequeue count
starts again), which writes the missed row once Table storage answers and then runs afresh.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ServiceRequestError

from shared import triggers
from shared.ledger import Ledger, LedgerError
from shared.model import WorkItem
from shared.settings import Settings
from shared.workqueue import WorkQueue
from simulator import Simulator
from tests.test_function_app import app_env, drain, history, queue_client, remediations, sim, vm_id
from tests.test_worker_delivery import (
    TableOutage,
    expire_lease,
    item,
    table_outage,
    verdict,
    wait_for_retry,
)

__all__ = ["app_env", "sim", "table_outage"]

HOST_JSON = Path(__file__).resolve().parent.parent / "host.json"


def max_dequeue_count() -> int:
    return int(json.loads(HOST_JSON.read_text())["extensions"]["queues"]["maxDequeueCount"])


def logged(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        json.loads(r.getMessage().split(" ", 1)[1])
        for r in caplog.records
        if r.name == "avma_remediator.outcomes"
    ]


@pytest.fixture
def no_delay(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """DEFER_DELAY_SECONDS=0: each carried copy is visible at once, so the test need not wait."""
    monkeypatch.setenv("DEFER_DELAY_SECONDS", "0")
    return {**app_env, "DEFER_DELAY_SECONDS": "0"}


async def test_an_outage_longer_than_the_hosts_retries_is_carried_past_the_poison_queue(
    no_delay: dict[str, str],
    sim: Simulator,
    table_outage: TableOutage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    deliveries = max_dequeue_count() + 2  # more than the host would make of one message
    table_outage.planned = 10**6  # from the first remediation's answer until said otherwise
    with caplog.at_level(logging.INFO, logger="avma_remediator.outcomes"):
        [first] = await triggers.work(item("web-01", "long-outage"))
    assert (first.kind.value, first.reason, first.details["copies"]) == (
        "deferred",
        "ledger-unavailable",
        1,
    )
    # the outcome was logged before the ledger refused it, and the carried copy too
    assert [(o["outcome"], o["reason"]) for o in logged(caplog)] == [
        ("remediated", "avma-channel"),
        ("deferred", "ledger-unavailable"),
    ]
    since = first.details["since"]
    for copy in range(1, deliveries):
        async with queue_client(no_delay) as queue:
            [message] = [m async for m in queue.receive_messages(max_messages=5, visibility_timeout=60)]
            assert message.dequeue_count == 1  # a fresh message: the host's count starts again
            body = json.loads(message.content)
            assert (body["ledgerMissed"], body["ledgerMissedSince"]) == (copy, since)
            [outcome] = await triggers.work(message.content)
            assert (outcome.reason, outcome.details["copies"]) == ("ledger-unavailable", copy + 1)
            await queue.delete_message(message)
    async with queue_client(no_delay, triggers.POISON_QUEUE) as poison:
        assert await poison.peek_messages() == []

    table_outage.failures_left = 0  # storage is back
    async with queue_client(no_delay) as queue:
        [message] = [m async for m in queue.receive_messages(visibility_timeout=60)]
        [outcome] = await triggers.work(message.content)
        await queue.delete_message(message)
    # the first delivery's lease could not be released during the outage: its time frees it
    assert (outcome.kind.value, outcome.reason) == ("deferred", "lease-held")
    await wait_for_retry(no_delay)
    await expire_lease(no_delay, "web-01")
    assert len(await drain(no_delay)) == 1
    rows = await history(no_delay, vm_id("web-01"))
    # the last one's first Run Command is a conditional re-key (its intent first), which finds the
    # VM already a KMS client and changes nothing (``remediations`` below counts what changed it)
    assert [(r["outcome"], r["reason"]) for r in rows] == [
        ("healthy", "kms-client-licensed"),
        ("intent", "remediate:avma-channel"),
        ("deferred", "lease-held"),
        ("deferred", "ledger-unavailable"),
        ("intent", "remediate:avma-channel"),
    ]
    missed = rows[3]
    assert missed["details"] == {"copies": deliveries, "since": since}
    assert missed["correlationId"] == "long-outage" and missed["attempt"] == 0
    assert rows[0]["details"]["interrupted"]["phase"] == "remediate"
    assert remediations(sim, "web-01") == 1  # never re-keyed twice
    stored = await verdict(no_delay, "web-01")
    assert stored is not None and stored.outcome.value == "healthy"
    async with queue_client(no_delay, triggers.POISON_QUEUE) as poison:
        assert await poison.peek_messages() == []


async def test_the_carried_copys_delay_doubles_and_stays_under_the_share_of_the_deadline(
    app_env: dict[str, str], table_outage: TableOutage
) -> None:
    """DEFER_DELAY_SECONDS=1 (app_env): the k-th copy waits 2^k s, at most 1/16 of the deadline."""
    table_outage.failures_left = 10**6  # down from the start
    carried = json.loads(item("web-01", "backoff")) | {
        "ledgerMissed": 3,
        "ledgerMissedSince": datetime.now(UTC).isoformat(),
    }
    [outcome] = await triggers.work(json.dumps(carried))
    assert (outcome.reason, outcome.details["retryInS"], outcome.details["copies"]) == (
        "ledger-unavailable",
        8.0,
        4,
    )
    carried["ledgerMissed"] = 40
    [outcome] = await triggers.work(json.dumps(carried))
    assert outcome.details["retryInS"] == Settings.from_env(app_env).defer_deadline_s / 16


async def test_an_outage_past_the_deadline_is_handed_to_the_host_and_its_poison_queue(
    app_env: dict[str, str], table_outage: TableOutage
) -> None:
    table_outage.failures_left = 10**6
    deadline = Settings.from_env(app_env).defer_deadline_s
    carried = json.loads(item("web-01", "too-long")) | {
        "ledgerMissed": 12,
        "ledgerMissedSince": (datetime.now(UTC) - timedelta(seconds=deadline + 1)).isoformat(),
    }
    with pytest.raises(LedgerError, match="unreachable"):
        await triggers.work(json.dumps(carried))
    async with queue_client(app_env) as queue:
        assert await queue.peek_messages() == []  # no copy: the host's retries take over


async def test_a_queue_that_refuses_the_copy_too_leaves_the_message_to_the_host(
    app_env: dict[str, str], table_outage: TableOutage, monkeypatch: pytest.MonkeyPatch
) -> None:
    table_outage.failures_left = 10**6

    async def refused(self: WorkQueue, work: WorkItem, *, delay_s: float = 0.0) -> None:
        raise ServiceRequestError("queue storage unreachable (test outage)")

    monkeypatch.setattr(WorkQueue, "send", refused)
    with pytest.raises(LedgerError, match="unreachable"):
        await triggers.work(item("web-01", "both-down"))


async def test_a_definite_refusal_of_the_table_is_not_carried(
    app_env: dict[str, str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong account key (Azurite answers 403 AuthenticationFailed): another try changes nothing."""
    async with Ledger.from_settings(Settings.from_env(app_env)) as ledger:
        await ledger.create_table_if_needed()  # deployed: only the worker's own calls are refused
    monkeypatch.setattr(Ledger, "create_table_if_needed", _exists)
    real_from_settings = Ledger.from_settings.__func__  # type: ignore[attr-defined]
    bad = app_env["AzureWebJobsStorage"].replace("AccountKey=", "AccountKey=AAAA", 1)

    def from_settings(
        cls: type[Ledger], settings: Settings, credential: Any = None, **options: Any
    ) -> Ledger:
        from dataclasses import replace

        return real_from_settings(cls, replace(settings, storage_connection=bad), credential, **options)  # type: ignore[no-any-return]

    monkeypatch.setattr(Ledger, "from_settings", classmethod(from_settings))
    with pytest.raises(LedgerError, match=r"acquire failed .*failed to authenticate"):
        await triggers.work(item("web-01", "refused"))
    async with queue_client(app_env) as queue:
        assert await queue.peek_messages() == []
    assert sim.run_log(vm_id("web-01")) == []  # nothing ran without a lease


async def _exists(self: Ledger) -> None:
    """The table is there (created above with the right key)."""


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ledgerMissed", -1),
        ("ledgerMissed", True),
        ("ledgerMissed", "3"),
        ("ledgerMissed", 1.5),
        ("ledgerMissedSince", "yesterday"),
        ("ledgerMissedSince", 17),
        ("ledgerMissedSince", "0001-01-01T00:00:00+01:00"),
    ],
)
def test_a_forged_carried_copy_is_refused_with_the_field_named(field: str, value: object) -> None:
    body = json.loads(item("web-01", "forged")) | {
        "ledgerMissed": 2,
        "ledgerMissedSince": "2026-01-01T00:00:00Z",
    }
    body[field] = value
    with pytest.raises(ValueError, match=field):
        WorkItem.from_dict(body)


def test_a_carried_copy_is_clamped_like_every_other_counter() -> None:
    now = datetime.now(UTC)
    future = (now + timedelta(days=3650)).isoformat()
    body = json.loads(item("web-01", "forged")) | {"ledgerMissed": 10**9, "ledgerMissedSince": future}
    parsed = WorkItem.from_dict(body)
    assert parsed.ledger_missed == 1000  # MAX_ATTEMPT, as attempt and unreadable
    # a "since" in the future would put the storage deadline off for ever: it becomes now
    assert parsed.clamped(now).ledger_missed_since == now.isoformat()
    round_trip = WorkItem.from_dict(json.loads(json.dumps(parsed.to_dict())))
    assert (round_trip.ledger_missed, round_trip.ledger_missed_since) == (1000, future)
    # a count of none carries no time
    plain = WorkItem.from_dict(json.loads(item("web-01", "plain")) | {"ledgerMissedSince": future})
    assert (plain.ledger_missed, plain.ledger_missed_since, "ledgerMissed" in plain.to_dict()) == (
        0,
        "",
        False,
    )
