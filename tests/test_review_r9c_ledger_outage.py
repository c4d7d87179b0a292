"""Review r9c of the Table-outage carry (issue 9, item 7's last gap): shared/worker.py ``handle``,
``_outlast_storage`` and the "a retry is sent only after its row" rule.

Fakes stand in for the ledger, the queue and the workflow, so that each ledger call can fail on its
own, the way one Table partition or one operation does (a 5xx on the VM's state row while the
history rows go through). A failure is raised as the ledger raises it: a ``LedgerError`` from the
azure-core exception (``ServiceRequestError`` for a refused connection; ``HttpResponseError`` with a
``status_code`` for an answer), so ``storage_unavailable`` reads the real chain.

Found by the review (each test below named with the defect fails on b1acb0a):

- a carried copy whose ``deferred: ledger-unavailable`` row is written, and whose workflow then meets
  the outage again, started the count and ``since`` afresh: a ledger that takes the history row but
  never the VM's state row carried the item for ever at the shortest delay, one row per copy, and
  never reached DEFER_DEADLINE_HOURS or the poison queue;
- a release Table storage refused after the outcome row was written left the deferral's retry (or
  the lease-lost wait) on the queue *and* a carried copy: two continuations of one delivery.

The rest pin what the change claims, against the mutants the brief names (each checked to fail on
the mutant by hand): a deferral's retry sent before its row, in each of the three places.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from shared.azure.transient import TransientError
from shared.ledger import LeaseLost, LedgerError, TableMissing, storage_unavailable
from shared.model import Outcome, OutcomeKind, Trigger, VmId, WorkItem
from shared.settings import Settings
from shared.worker import Worker
from shared.workflow import BeforeRunCommand, Recent

VM = VmId.parse(
    "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg/providers/"
    "Microsoft.Compute/virtualMachines/web-01"
)
SETTINGS = Settings.from_env({})


def unreachable(operation: str = "record") -> LedgerError:
    """What the ledger raises when Table storage refuses the connection (after its own tries)."""
    try:
        raise ServiceRequestError("Cannot connect to host (test outage)")
    except ServiceRequestError as cause:
        error = LedgerError(f"ledger {operation} failed for web-01: cannot connect")
        error.__cause__ = cause
        return error


def answered(status: int, code: str, kind: type[HttpResponseError] = HttpResponseError) -> LedgerError:
    """What the ledger raises when Table storage answers ``status`` (the SDK's error, as cause)."""
    cause = kind(message=f"{code}\nErrorCode:{code}")
    cause.status_code = status
    error = LedgerError(f"ledger record failed for web-01: {code}")
    error.__cause__ = cause
    return error


class _Lease:
    previous = None
    interrupted: dict[str, Any] | None = None


class _Ledger:
    """Each operation answers, or raises what ``fail`` names for it."""

    def __init__(self, **fail: LedgerError) -> None:
        self.fail = fail
        self.held = False  # acquire answers None: another workflow holds the VM
        self.rows: list[tuple[str, str, dict[str, Any]]] = []
        self.released: list[Outcome | None] = []

    def _maybe(self, operation: str) -> None:
        if operation in self.fail:
            raise self.fail[operation]

    async def acquire(self, vm_id: VmId, *, owner: str, now: datetime | None = None) -> Any:
        self._maybe("acquire")
        return None if self.held else _Lease()

    async def release(self, lease: Any, outcome: Outcome | None) -> None:
        self._maybe("release")
        self.released.append(outcome)

    async def renew(self, lease: Any, *, intent: Mapping[str, Any] | None = None) -> None:
        self._maybe("renew")

    async def record_intent(self, vm_id: VmId, **kwargs: Any) -> None:
        self._maybe("record_intent")

    async def record(self, vm_id: VmId, *, outcome: Outcome, **kwargs: Any) -> None:
        self._maybe("record")
        self.rows.append((outcome.kind.value, outcome.reason, dict(outcome.details)))

    async def record_event(self, target: str, *, kind: str, reason: str, **kwargs: Any) -> None:
        self._maybe("record_event")
        self.rows.append((kind, reason, dict(kwargs.get("details", {}))))


class _Queue:
    def __init__(self) -> None:
        self.sent: list[tuple[WorkItem, float]] = []

    async def send(self, item: WorkItem, *, delay_s: float = 0.0) -> None:
        self.sent.append((item, delay_s))


class _Workflow:
    """Answers ``outcome`` after one detection Run Command (its hook awaited), or raises LeaseLost."""

    def __init__(self, outcome: Outcome | None = None, *, lose_lease: bool = False) -> None:
        self.outcome = outcome
        self.lose_lease = lose_lease
        self.runs = 0

    async def check(
        self, vm_id: VmId, *, before_run_command: BeforeRunCommand | None = None, recent: Recent | None = None
    ) -> Outcome:
        self.runs += 1
        if self.lose_lease:
            raise LeaseLost(f"lease on {vm_id} expired and was taken over")
        if before_run_command is not None:
            await before_run_command("detect", {})
        assert self.outcome is not None
        return Outcome(str(vm_id), self.outcome.kind, self.outcome.reason, details=dict(self.outcome.details))


class _Resolver:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def resolve_computer(self, computer: str) -> list[VmId]:
        if self.error is not None:
            raise self.error
        return [VM]


class _Throttled(TransientError):
    reason = "throttled"


HEALTHY = Outcome(str(VM), OutcomeKind.HEALTHY, "kms-client-licensed", details={"osDiskId": "disk-1"})
NOT_READY = Outcome(str(VM), OutcomeKind.DEFERRED, "agent-not-ready")


def worker(ledger: _Ledger, queue: _Queue, workflow: _Workflow, resolver: _Resolver | None = None) -> Worker:
    return Worker(
        remediator=workflow, ledger=ledger, queue=queue, resolver=resolver or _Resolver(), settings=SETTINGS
    )


def vm_item(**fields: Any) -> WorkItem:
    base: dict[str, Any] = {
        "vm_id": VM,
        "correlation_id": "c-1",
        "attempt": 2,
        "first_seen": datetime.now(UTC).isoformat(),
    }
    return WorkItem(Trigger.SWEEP, **(base | fields))


# --------------------------------------------------------------------------- defects found


async def test_a_copy_whose_missed_row_is_written_keeps_its_count_and_since_when_the_outage_returns() -> None:
    """The history row goes through, the VM's state row does not (a 5xx on one partition): the next
    copy counts on from this one, and its "since" is still the first missed delivery's."""
    since = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    ledger, queue = _Ledger(acquire=unreachable("acquire")), _Queue()
    [outcome] = await worker(ledger, queue, _Workflow(HEALTHY)).handle(
        vm_item(ledger_missed=3, ledger_missed_since=since)
    )
    assert ledger.rows == [("deferred", "ledger-unavailable", {"copies": 3, "since": since})]
    assert (outcome.reason, outcome.details["copies"], outcome.details["since"]) == (
        "ledger-unavailable",
        4,
        since,
    )
    [(copy, delay)] = queue.sent
    assert (copy.ledger_missed, copy.ledger_missed_since, copy.attempt) == (4, since, 2)
    assert delay == SETTINGS.defer_delay_s * 2**3  # the backoff goes on growing, not back to the first


async def test_a_ledger_that_takes_the_missed_row_but_never_the_vms_gives_up_at_the_deadline() -> None:
    """Before the review each copy wrote its row, met the outage again and was carried from a fresh
    "since": carried for ever, every DEFER_DELAY_SECONDS, one history row each, never poison."""
    since = (datetime.now(UTC) - timedelta(seconds=SETTINGS.defer_deadline_s + 1)).isoformat()
    ledger, queue = _Ledger(acquire=unreachable("acquire")), _Queue()
    with pytest.raises(LedgerError, match="acquire"):
        await worker(ledger, queue, _Workflow(HEALTHY)).handle(
            vm_item(ledger_missed=19, ledger_missed_since=since)
        )
    assert queue.sent == []  # no copy: the host's retries, the poison queue and its handler take over


@pytest.mark.parametrize("outcome", [NOT_READY, HEALTHY], ids=["deferred", "final"])
async def test_a_release_refused_after_the_outcome_row_leaves_one_continuation_not_two(
    outcome: Outcome,
) -> None:
    """The row is written, the release (the verdict and the lease) is not: the carried copy is the
    one continuation. Before the review a deferral's retry was on the queue already, so the carried
    copy made a second chain of retries for the same delivery, each running to the deadline."""
    ledger, queue = _Ledger(release=unreachable("release")), _Queue()
    [answer] = await worker(ledger, queue, _Workflow(outcome)).handle(vm_item())
    assert (answer.kind.value, answer.reason) == ("deferred", "ledger-unavailable")
    assert [row[:2] for row in ledger.rows] == [(outcome.kind.value, outcome.reason)]
    [(copy, _)] = queue.sent
    assert (copy.ledger_missed, copy.attempt, copy.correlation_id) == (1, 2, "c-1")


async def test_a_release_refused_after_a_lost_lease_leaves_one_continuation_not_two() -> None:
    ledger, queue = _Ledger(release=unreachable("release")), _Queue()
    [answer] = await worker(ledger, queue, _Workflow(lose_lease=True)).handle(vm_item())
    assert answer.reason == "ledger-unavailable"
    [(copy, _)] = queue.sent
    assert copy.ledger_missed == 1
    assert ledger.rows == []  # the lease-lost wait was never recorded: the copy runs afresh


# --------------------------------------------------------------------------- mutants: a retry before its row


def _deferral_cases() -> list[Any]:
    computer = WorkItem(
        Trigger.LOG_SCAN, computer="web-01", correlation_id="c-1", first_seen=datetime.now(UTC).isoformat()
    )
    return [
        pytest.param(vm_item(), _Workflow(NOT_READY), None, False, "record", id="workflow-deferral"),
        pytest.param(computer, _Workflow(HEALTHY), _Throttled("429"), False, "record_event", id="throttled"),
        pytest.param(vm_item(), _Workflow(HEALTHY), None, True, "record", id="lease-held"),
    ]


@pytest.mark.parametrize(("item", "workflow", "lookup", "held", "operation"), _deferral_cases())
async def test_a_deferral_whose_row_is_unreachable_is_carried_once_and_its_retry_never_sent(
    item: WorkItem, workflow: _Workflow, lookup: Exception | None, held: bool, operation: str
) -> None:
    ledger, queue = _Ledger(**{operation: unreachable(operation)}), _Queue()
    ledger.held = held
    [answer] = await worker(ledger, queue, workflow, _Resolver(lookup)).handle(item)
    assert answer.reason == "ledger-unavailable"
    # one message for one delivery: the carried copy of the item as it came, not its retry too
    assert [(c.ledger_missed, c.attempt, c.computer, c.vm_id) for c, _ in queue.sent] == [
        (1, item.attempt, item.computer, item.vm_id)
    ]


@pytest.mark.parametrize(("item", "workflow", "lookup", "held", "operation"), _deferral_cases())
async def test_a_deferral_whose_row_is_refused_sends_nothing_and_leaves_the_message_to_the_host(
    item: WorkItem, workflow: _Workflow, lookup: Exception | None, held: bool, operation: str
) -> None:
    """403: the host retries this very message; a retry already sent would make two of it."""
    ledger = _Ledger(**{operation: answered(403, "AuthorizationPermissionMismatch")})
    ledger.held = held
    queue = _Queue()
    with pytest.raises(LedgerError, match="AuthorizationPermissionMismatch"):
        await worker(ledger, queue, workflow, _Resolver(lookup)).handle(item)
    assert queue.sent == []


# --------------------------------------------------------------------------- what is "unavailable"


@pytest.mark.parametrize(
    ("error", "carried"),
    [
        # azure-core: no request sent / no readable answer (sdk/core/azure-core/README.md)
        (unreachable(), True),
        (LedgerError("no table storage configured"), False),
        # Table answers (common-rest-api-error-codes): ServerBusy 503, OperationTimedOut and
        # InternalError 500; a throttle 429; a request timeout 408
        (answered(503, "ServerBusy"), True),
        (answered(500, "OperationTimedOut"), True),
        (answered(500, "InternalError"), True),
        (answered(429, "TooManyRequests"), True),
        (answered(408, "RequestTimeout"), True),
        # definite refusals: azure-data-tables raises ClientAuthenticationError for
        # AuthenticationFailed (403) and HttpResponseError for AuthorizationPermissionMismatch (403)
        (answered(403, "AuthenticationFailed", ClientAuthenticationError), False),
        (answered(403, "AuthorizationPermissionMismatch"), False),
        (answered(401, "InvalidAuthenticationInfo", ClientAuthenticationError), False),
        (answered(400, "PropertyValueTooLarge"), False),
        (answered(404, "EntityNotFound", ResourceNotFoundError), False),
        (answered(412, "UpdateConditionNotSatisfied", ResourceModifiedError), False),
        (TableMissing("ledger table 'x' does not exist"), False),
        (LeaseLost("lease on web-01 expired and was taken over"), False),
    ],
)
def test_only_an_unreachable_or_overloaded_table_is_carried(error: LedgerError, carried: bool) -> None:
    assert storage_unavailable(error) is carried


def test_a_response_the_client_could_not_read_and_a_timeout_are_unavailable() -> None:
    for cause in (ServiceResponseError("connection reset"), TimeoutError()):
        error = LedgerError("ledger record failed")
        error.__cause__ = cause
        assert storage_unavailable(error)
