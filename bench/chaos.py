"""Chaos run: the whole queue path under faults, at scale, with duplicates; figures and invariants.

A generated estate (every category of docs/simulator.md) runs in a simulator process with every
fault kind on (docs/reliability.md lists them). This process plays the Functions host as host.json
configures it: it receives ``vm-checks`` messages from Azurite with a visibility lease, calls the
``vm_check`` function's body (``shared.triggers.work``) once per message, deletes the message on
success, lets it come back after a failed invocation, moves it to ``vm-checks-poison`` after
``maxDequeueCount`` (5) and runs the poison handler (``shared.triggers.poison``) there. The
producers are the real sweep timer (``shared.triggers.sweep_scope``: Resource Graph, then the
queue), the real log-scan timer (``shared.triggers.log_scan``: Log Analytics, with partial
errors), and this harness for what Event Grid and alerts would send: a vm-created item per Linux
VM, alert items that name only a computer (some unknown), malformed messages, a few "poison pills"
whose every invocation the harness crashes, and ten identical copies of the item of a share of the
VMs (at-least-once redelivery). Azurite is restarted mid-run (in memory: queues and ledger are
lost), after which the sweep timer fires again, as it would in Azure.

The harness injects faults of its own into the engine's process (``EngineHooks``; the kinds are
``HARNESS_FAULTS``): invocations killed at four points of the workflow, the Table endpoint and the
Queue endpoint down, Resource Graph throttled, the poison handler failing, hostile input, and input
for VMs of a subscription left out of ``TARGET_SUBSCRIPTIONS``. It records every work item any
producer put on the queue, so that ``lost`` is judged from the producers' side.

Two passes: an audit pass (REMEDIATION_MODE=audit, its own smaller estate, no restart) proves that
audit mode changes nothing; then the enforce pass. Invariants are computed from sources the engine
does not control: the simulator's run log and state dump, the ledger table read directly, and this
harness's record of what it sent. Progress goes to stderr; the last line printed is one JSON object.

    python bench/chaos.py                       # defaults: 2,000 VMs, every fault, duplicates
    python bench/chaos.py --vms 500 --fault serverError=0.05 --seed 3 --report-out report.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import logging
import os
import random
import re
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from azure.core.exceptions import AzureError, ResourceExistsError, ServiceRequestError  # noqa: E402
from azure.core.pipeline.transport import AioHttpTransport  # noqa: E402
from azure.data.tables.aio import TableClient  # noqa: E402
from azure.storage.queue import TextBase64DecodePolicy, TextBase64EncodePolicy  # noqa: E402
from azure.storage.queue.aio import QueueClient  # noqa: E402

import shared.ledger._table as ledger_table  # noqa: E402
import shared.settings as engine_settings  # noqa: E402
from shared import triggers  # noqa: E402
from shared.azure.compute import ComputeGateway  # noqa: E402
from shared.ledger import STATE_PARTITION, Ledger  # noqa: E402
from shared.model import MAX_ATTEMPT, Trigger, VmId, WorkItem  # noqa: E402
from shared.settings import POISON_QUEUE, WORK_QUEUE  # noqa: E402
from shared.workqueue import WorkQueue  # noqa: E402
from simulator import Estate, VmSpec  # noqa: E402
from simulator.faults import KINDS, FaultPlan  # noqa: E402
from simulator.guest import KMS_HOSTS, key_for  # noqa: E402
from simulator.process import CALLS, SimulatorProcess  # noqa: E402
from simulator.server import Simulator  # noqa: E402
from tests.azurite import Azurite, _free_ports, azurite_binary  # noqa: E402
from tests.payloads import EG_WRITE, as_vm_write, dim, load, v2_alert  # noqa: E402

log = logging.getLogger("chaos")

RESTART_FAULT = "azuriteRestart"  # the one fault the harness injects itself (the simulator has no storage)
POISON_POISON_QUEUE = POISON_QUEUE + "-poison"  # where the host would put poison messages that fail too
POISON_PILL = "poison-pill"  # the correlation id of items whose invocations the harness crashes
OPT_OUT_TAG = "avma-remediator-opt-out"
SWEEP_ATTEMPTS = 30
STORAGE_ERRORS = frozenset({"LedgerError", "TableMissing", "QueueError", "QueueMissing"})
FINAL_KINDS = frozenset({"healthy", "remediated", "would-remediate", "skipped", "failed"})
POISON_HARD = POISON_PILL + "-hard"  # a pill whose poison-handler invocations crash too (poison_failure)
# The faults the harness injects into the engine's process (the simulator counts its own KINDS).
HARNESS_FAULTS = (
    "worker_crash",  # an invocation killed (its task cancelled, its message not deleted) at a CRASH_POINT
    "table_outage",  # requests refused while the Table endpoint is down (the queue still works)
    "queue_outage",  # requests refused while the Queue endpoint is down (alerts posted meanwhile)
    "graph_throttle",  # Resource Graph queries answered 429 RateLimiting (the simulator's record)
    "poison_failure",  # poison-handler invocations that failed (crashed on purpose, or storage down)
    "hostile_input",  # control characters in ids, an oversized fan-out, a huge attempt
    "out_of_scope",  # events, alerts and messages for VMs outside TARGET_SUBSCRIPTIONS
)
CRASH_POINTS = ("detect", "remediate", "accepted", "acked")
# Rows that answer a delivery without running the workflow (no Run Command behind them).
NO_WORKFLOW = frozenset({"lease-held", "lease-lost", "duplicate", "out-of-scope", "recently-verified"})

# Every category of the generator (docs/simulator.md); the rest are licensed KMS clients.
CHAOS_MIX: dict[str, float] = {
    "avma": 0.08,
    "avma_unreachable": 0.01,
    "avma_deallocated": 0.01,
    "avma_agent_not_ready": 0.01,
    "avma_opted_out": 0.01,
    "avma_busy": 0.01,
    "kms_unlicensed": 0.02,
    "kms_custom": 0.01,
    "retail": 0.01,
    "mak": 0.01,
    "oem": 0.01,
    "multi_session": 0.01,
    "unknown_edition": 0.01,
    "client_kms": 0.02,
    "linux": 0.05,
    "deallocated": 0.02,
}

# The default fault plan (the estate's ``faults`` section). Rates are per opportunity (see
# docs/simulator.md, "Faults"). The engine keeps one credential per process (shared.clients), so
# the token endpoint is asked only when a token is due: with the run's short-lived tokens
# (``token_lifetime_s``) that is a refresh about every 30 s per audience, and these bursts fail
# some of them (azure-identity keeps the valid token it has when a refresh fails).
DEFAULT_FAULTS: dict[str, Any] = {
    # Compute's own policies (docs/simulator.md, Faults), which ARM's subscription headers do not
    # show: each read policy a bucket smaller than the 32 workers' opening burst, so that throttling
    # fires however slow the machine (250 only emptied when the machine was fast enough); refill as ARM's.
    "armThrottling": {"timeScale": 3, "reads": {"size": 24, "perSecond": 25}},
    "serverError": 0.004,
    "runCommandBusy": 0.01,
    "operationFailed": 0.005,
    "runCommandHang": {"rate": 0.003, "seconds": 8},
    "vmVanish": 0.004,
    # Ready and Not Ready 5 s each (some 25 min in Azure's time): a strictly periodic flap faster
    # than the retries can alias with them, every look landing in a Not Ready half.
    "agentFlap": {"rate": 0.01, "periodSeconds": 5},
    "outputTruncated": 0.006,
    "outputGarbled": 0.006,
    "tokenError": {"every": 4, "burst": 3},
    "logPartialError": 0.5,
}


@dataclass(frozen=True)
class ChaosConfig:
    """Everything a run depends on; the defaults are the documented chaos run."""

    vms: int = 2000
    audit_vms: int = 400
    seed: int = 7
    subscriptions: int = 3
    mix: Mapping[str, float] = field(default_factory=lambda: dict(CHAOS_MIX))
    workers: int = 32
    latency_s: float = 0.05
    faults: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_FAULTS))
    dup_share: float = 0.10
    dup_copies: int = 10
    computer_items: int = 20
    unknown_computers: int = 2
    malformed: int = 6
    poison_pills: int = 3  # valid items whose every invocation the harness crashes (in the last wave)
    audit_poison_pills: int | None = None  # the audit pass's, if not the same
    hostile: bool = True  # hostile queue messages, events and alerts (HARNESS_FAULTS)
    storm: bool = True  # the enforce pass's last wave: outages, throttling, hostile and out-of-scope input
    restarts: int = 1
    restart_after: float = 0.35  # of the first wave's messages handled
    log_scan_every_s: float = 4.0
    # Tokens the simulator issues live this long: just over azure-core's 300 s refresh margin, so
    # that clients refresh (and meet tokenError) during the run without ever sending a stale token.
    token_lifetime_s: float = 330.0
    # Engine settings for compressed time (the run's env; docs/reliability.md).
    defer_delay_s: int = 1
    # Retry delays an item may add up before deadline-exceeded (the engine counts its scheduled
    # delays, not time in the queue's backlog, so these need not cover the backlog): some 19 looks.
    defer_deadline_h: float = 0.02  # 72 s
    audit_defer_deadline_h: float = 0.0083  # 30 s
    run_command_timeout_s: float = 3.0
    # The Functions host (host.json: maxDequeueCount 5, visibilityTimeout 00:01:00 scaled down).
    max_dequeue: int = 5
    retry_visibility_s: int = 1
    lease_visibility_s: int = 120
    max_poll_s: float = 0.5
    # A hang guard per pass, not an invariant: the enforce pass drained in 1,082 s at load 5-7 on the
    # two-core development machine (docs/reliability.md); 900 s cut such a run short.
    time_bound_s: float = 2400.0
    crash_grace_s: float = 10.0
    # Faults the harness injects (HARNESS_FAULTS), scaled by these.
    outside_subscriptions: int = 1  # subscriptions of the estate left out of TARGET_SUBSCRIPTIONS
    crashes_per_point: int = 3  # VMs whose first invocation reaching each CRASH_POINT is killed
    crash_visibility_s: float = 3.0  # a killed host's hold on its message runs out (compressed)
    table_outage_s: float = 20.0
    queue_outage_s: float = 4.0
    alert_retry_s: float = 1.0  # the action group's retry of a 503 (Retry-After compressed)
    graph_throttle: int = 8  # Resource Graph queries refused (429) from the storm on
    max_targets_per_alert: int = 10
    fan_out: int = 40  # targets of the oversized alert
    drain_every_s: float = 2.0  # the last-resort drain's timer
    # Compressed time for leases: LEASE_SECONDS must cover the worst-case workflow, whose ledger
    # part is 6 writes x (3 tries x LEDGER_TRY_TIMEOUT_S + backoff); the harness scales those down.
    ledger_try_timeout_s: float = 1.5
    ledger_backoff_s: float = 0.1
    arm_call_timeout_s: float = 8.0
    lease_s: float = 45.0
    # The simulator in a process of its own (the engine's figures are then its own), or, for a tiny
    # run where starting a process costs more than the run, on a thread of this one.
    simulator_process: bool = True
    report_out: str | None = None


class SimulatorThread:
    """:class:`SimulatorProcess`'s interface over a simulator on a thread of this process."""

    def __init__(self, estate: Estate, *, latency_s: float, token_lifetime_s: float) -> None:
        self._sim = Simulator(estate, latency_s=latency_s, token_lifetime_s=token_lifetime_s)

    def __enter__(self) -> SimulatorThread:
        self._sim.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sim.stop()

    def env(self) -> dict[str, str]:
        return dict(self._sim.env())

    def call(self, name: str, *args: Any) -> Any:
        if name not in CALLS:
            raise ValueError(f"{name!r} is not a simulator hook")
        return getattr(self._sim, name)(*args)


# ------------------------------------------------------------------ the Functions host


@dataclass
class HostStats:
    invocations: int = 0
    succeeded: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    failure_times: list[tuple[float, str, str]] = field(default_factory=list)  # (when, type, message)
    poisoned: list[tuple[int, str]] = field(default_factory=list)  # (epoch, body)
    completed_correlations: list[tuple[int, str]] = field(default_factory=list)
    receive_errors: int = 0
    lost_acks: int = 0  # deletes or visibility updates the storage refused (e.g. during a restart)
    killed: Counter[str] = field(default_factory=Counter)  # invocations the harness killed, per point


class QueueHost:
    """One queue trigger of the Functions host, as host.json configures it (see the module doc)."""

    def __init__(
        self,
        connection: str,
        queue: str,
        poison_queue: str,
        handler: Callable[[str], Awaitable[object]],
        *,
        config: ChaosConfig,
        epoch: Callable[[], int],
    ) -> None:
        self.connection = connection
        self.queue = queue
        self.poison_queue = poison_queue
        self.handler = handler
        self.config = config
        self.epoch = epoch
        self.stats = HostStats()
        self.in_flight = 0

    def _client(self, name: str) -> QueueClient:
        return harness_queue(self.connection, name)

    async def run(self, stop: asyncio.Event) -> None:
        tasks: set[asyncio.Task[None]] = set()
        idle = 0.02
        async with self._client(self.queue) as queue, self._client(self.poison_queue) as poison:
            while not stop.is_set():
                free = self.config.workers - len(tasks)
                if free <= 0:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                batch = min(32, free)
                try:
                    messages = [
                        m
                        async for m in queue.receive_messages(
                            messages_per_page=batch,
                            max_messages=batch,
                            visibility_timeout=self.config.lease_visibility_s,
                        )
                    ]
                except AzureError as error:
                    self.stats.receive_errors += 1  # storage down or queue gone: poll again later
                    log.debug("receive failed: %s", str(error)[:300])
                    await asyncio.sleep(self.config.max_poll_s)
                    continue
                if not messages:
                    await asyncio.sleep(idle)
                    idle = min(idle * 2, self.config.max_poll_s)
                    continue
                idle = 0.02
                for message in messages:
                    task = asyncio.create_task(self._invoke(queue, poison, message))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)

    async def _invoke(self, queue: QueueClient, poison: QueueClient, message: Any) -> None:
        self.in_flight += 1
        try:
            if message.dequeue_count > self.config.max_dequeue:
                await self._to_poison(queue, poison, message)
                return
            self.stats.invocations += 1
            body = str(message.content)
            try:
                await self.handler(body)
            except WorkerKilled as killed:
                # A dead host neither deletes the message nor fails it: it comes back once the
                # host's hold on it runs out (compressed here), with its dequeue count one higher.
                self.stats.killed[str(killed)] += 1
                try:
                    await queue.update_message(
                        message, visibility_timeout=int(self.config.crash_visibility_s)
                    )
                except AzureError:
                    self.stats.lost_acks += 1  # it comes back after the receive's own visibility
                return
            except Exception as error:  # noqa: BLE001 - the host: an invocation that raises failed, the message returns
                name = type(error).__name__
                self.stats.failures[name] += 1
                self.stats.failure_times.append((time.monotonic(), name, str(error)[:300]))
                log.debug("invocation failed: %s: %s", name, str(error)[:200])
                if message.dequeue_count >= self.config.max_dequeue:
                    await self._to_poison(queue, poison, message)
                else:
                    try:
                        await queue.update_message(message, visibility_timeout=self.config.retry_visibility_s)
                    except AzureError:
                        self.stats.lost_acks += 1
                return
            self.stats.succeeded += 1
            self.stats.completed_correlations.append((self.epoch(), _correlation(body)))
            try:
                await queue.delete_message(message)
            except AzureError:
                self.stats.lost_acks += 1
        finally:
            self.in_flight -= 1

    async def _to_poison(self, queue: QueueClient, poison: QueueClient, message: Any) -> None:
        try:
            await poison.send_message(message.content)
            await queue.delete_message(message)
        except AzureError:
            self.stats.lost_acks += 1  # it comes back and is moved on its next delivery
            return
        self.stats.poisoned.append((self.epoch(), str(message.content)))


def harness_queue(connection: str, name: str) -> QueueClient:
    """A queue client of the harness (the host, the senders): the storage SDK's default retry waits
    15 s before its first retry, so that after the restart every invocation in flight sat 15 s on
    its message's delete with a dead connection; the host's own calls retry after about a second."""
    return QueueClient.from_connection_string(
        connection,
        name,
        message_encode_policy=TextBase64EncodePolicy(),
        message_decode_policy=TextBase64DecodePolicy(),
        initial_backoff=1,  # the SDK's ExponentialRetry, built from these keywords (its default: 15, 3, 3)
        increment_base=2,
        random_jitter_range=1,
    )


def _correlation(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    return str(data.get("correlationId") or "") if isinstance(data, dict) else ""


# ------------------------------------------------------------------ faults inside the engine's process


class WorkerKilled(Exception):
    """The harness killed this invocation: the host neither acks nor fails the message."""


@dataclass
class Invocation:
    """One ``vm_check`` invocation as the harness sees it (its crash point, its task)."""

    vm: str  # the VM's key, "" for a computer name or a malformed body
    point: str  # a CRASH_POINT, "" when this invocation is not to be killed
    task: asyncio.Task[Any] | None = None
    killed: bool = False
    run_commands: int = 0  # Run Commands it has sent so far


_INVOCATION: contextvars.ContextVar[Invocation | None] = contextvars.ContextVar(
    "chaos_invocation", default=None
)


@dataclass(frozen=True)
class Produced:
    """A work item some producer (sweep, log scan, webhook, event, the worker itself) put on the queue."""

    epoch: int
    target: str  # _target_key of the item's target
    correlation: str
    attempt: int
    carried: bool = False  # a copy carried past a Table outage (``ledgerMissed``)


class EngineHooks:
    """What the harness does inside the engine's process, as patches installed for one pass:

    - **outages**: every HTTP request to a storage endpoint (by port) that is down is refused with
      the error a refused connection gives (``ServiceRequestError``), for the engine and the harness;
    - **kills**: at a crash point the invocation's task is cancelled; from then on its ledger and
      queue calls raise ``CancelledError`` at once (a dead process writes nothing: no release, no
      outcome), and the host leaves its message to come back (``WorkerKilled``);
    - **the producers' record**: every work item any code sends through ``WorkQueue.send`` is noted
      (``Produced``) after the queue accepted it, so that ``lost`` is judged from what was produced;
    - **compressed time**: the ledger's per-try timeout and backoff scaled down (with the budget
      ``Settings`` checks ``LEASE_SECONDS`` against), so that a killed worker's lease expires in
      seconds, not minutes.
    """

    def __init__(self, config: ChaosConfig, epoch: Callable[[], int]) -> None:
        self.config = config
        self.epoch = epoch
        self.down: dict[int, tuple[str, float]] = {}  # port -> (fault, until monotonic)
        self.refused: Counter[str] = Counter()
        self.plan: dict[str, str] = {}  # VM key -> crash point, until it fired
        self.kills: list[tuple[float, str, str]] = []  # (monotonic, VM key, point)
        self.produced: list[Produced] = []

    def outage(self, port: int, fault: str, seconds: float) -> None:
        self.down[port] = (fault, time.monotonic() + seconds)

    def _refusing(self, url: str) -> str | None:
        port = urlparse(url).port
        if port is None or port not in self.down:
            return None
        fault, until = self.down[port]
        if time.monotonic() >= until:
            del self.down[port]
            return None
        return fault

    def kill(self, invocation: Invocation) -> bool:
        """Kill ``invocation`` if its VM's crash point has not fired yet (once per planned VM)."""
        if self.plan.get(invocation.vm) != invocation.point:
            return False
        del self.plan[invocation.vm]
        self.kills.append((time.monotonic(), invocation.vm, invocation.point))
        invocation.killed = True
        if invocation.task is not None and invocation.point != "acked":
            invocation.task.cancel()
        return True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        hooks = self
        send_http = AioHttpTransport.send
        run_command = ComputeGateway.run_command
        enqueue = WorkQueue.send

        async def send(transport: AioHttpTransport, request: Any, **kwargs: Any) -> Any:
            fault = hooks._refusing(str(request.url))
            if fault is not None:
                hooks.refused[fault] += 1
                raise ServiceRequestError(f"chaos {fault}: connection refused")
            return await send_http(transport, request, **kwargs)

        async def run(gateway: ComputeGateway, vm_id: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
            invocation = _INVOCATION.get()
            if invocation is None or invocation.killed or not invocation.point:
                return await run_command(gateway, vm_id, body)
            remediation = _is_remediation(body)
            first = invocation.run_commands == 0
            invocation.run_commands += 1
            # "detect": killed during its first Run Command, which reads the VM (a detection, or a
            # conditional re-key that may find other facts, issue 12); "remediate": during one that
            # may change it (a remediation, or a conditional re-key on a VM it matches).
            mid = {"detect": first, "remediate": remediation}.get(invocation.point)
            if mid:
                # Killed while the command runs: the POST may or may not have been accepted.
                inner = asyncio.ensure_future(run_command(gateway, vm_id, body))
                inner.add_done_callback(_quiet)
                await asyncio.wait({inner}, timeout=max(hooks.config.latency_s / 2, 0.01))
                if hooks.kill(invocation):
                    inner.cancel()
                    await asyncio.sleep(0)  # the cancellation lands here
                return await inner
            answer = await run_command(gateway, vm_id, body)
            if invocation.point == "accepted" and remediation and hooks.kill(invocation):
                await asyncio.sleep(0)  # killed after the remediation ran, before its answer was used
            return answer

        async def sent(queue: WorkQueue, item: WorkItem, *, delay_s: float = 0.0) -> None:
            _alive()
            await enqueue(queue, item, delay_s=delay_s)
            hooks.produced.append(
                Produced(
                    hooks.epoch(),
                    _target_key(item.target),
                    item.correlation_id,
                    item.attempt,
                    carried=item.ledger_missed > 0,
                )
            )

        patches: list[tuple[Any, str, Any]] = [
            (AioHttpTransport, "send", send),
            (ComputeGateway, "run_command", run),
            (WorkQueue, "send", sent),
            (ledger_table, "LEDGER_TRY_TIMEOUT_S", self.config.ledger_try_timeout_s),
            (ledger_table.LedgerBase, "retry_backoff_s", self.config.ledger_backoff_s),
            (engine_settings, "LEDGER_WRITE_BUDGET_S", self._write_budget()),
        ]
        for name in ("acquire", "renew", "release", "_append"):
            patches.append((Ledger, name, _dead_writes_nothing(getattr(Ledger, name))))
        saved = [(owner, name, owner.__dict__.get(name, _MISSING)) for owner, name, _ in patches]
        for owner, name, value in patches:
            setattr(owner, name, value)
        try:
            yield
        finally:
            for owner, name, value in reversed(saved):
                if value is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, value)

    def _write_budget(self) -> float:
        tries = engine_settings.LEDGER_TRIES
        return tries * self.config.ledger_try_timeout_s + self.config.ledger_backoff_s * (
            (1 << (tries - 1)) - 1
        )


_MISSING = object()


def _alive() -> None:
    invocation = _INVOCATION.get()
    if invocation is not None and invocation.killed and invocation.point != "acked":
        raise asyncio.CancelledError  # a killed process sends and writes nothing more


def _dead_writes_nothing(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        _alive()
        return await method(self, *args, **kwargs)

    return guarded


def _quiet(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: an abandoned command's error is not an unhandled one


def _is_remediation(body: Mapping[str, Any]) -> bool:
    """The remediation script takes ``InstallKey`` (the detection script takes none)."""
    parameters = body.get("parameters") or []
    return any(isinstance(p, Mapping) and p.get("name") == "InstallKey" for p in parameters)


# ------------------------------------------------------------------ what the harness sends


@dataclass(frozen=True)
class Sent:
    """One logical message (``copies`` identical queue messages) and the wave it went out in."""

    kind: str  # linux | computer | unknown-computer | duplicate | poison-pill | malformed
    target: str  # VM id, computer:NAME, or the malformed message's token
    correlation: str
    copies: int
    epoch: int
    body: str


def plan_items(estate: Estate, config: ChaosConfig, rng: random.Random, now: str) -> list[Sent]:
    """The harness's messages, before they are split into waves (epoch filled in later)."""
    items: list[Sent] = []
    for vm in estate.vms:
        if vm.os != "Windows":
            item = WorkItem(Trigger.VM_CREATED, vm_id=VmId.parse(vm.id), correlation_id=f"eg-{vm.name}")
            items.append(_sent("linux", vm.id, item, 1))
    hostnames = Counter(vm.hostname.lower() for vm in estate.vms)
    named = [vm for vm in estate.vms if vm.os == "Windows" and hostnames[vm.hostname.lower()] == 1]
    for i, vm in enumerate(rng.sample(named, min(config.computer_items, len(named)))):
        item = WorkItem(Trigger.ALERT, computer=vm.hostname, correlation_id=f"alert-{i:03d}", first_seen=now)
        items.append(_sent("computer", vm.id, item, 1))
    for i in range(config.unknown_computers):
        name = f"GHOST-{i:04d}"
        item = WorkItem(Trigger.ALERT, computer=name, correlation_id=f"alert-ghost-{i:03d}", first_seen=now)
        items.append(_sent("unknown-computer", f"computer:{name}", item, 1))
    share = max(1, round(len(estate.vms) * config.dup_share)) if config.dup_share > 0 else 0
    for vm in rng.sample(list(estate.vms), min(share, len(estate.vms))):
        item = WorkItem(
            Trigger.VM_CREATED,
            vm_id=VmId.parse(vm.id),
            correlation_id=f"redelivered-{vm.name}",
            source="eventgrid-redelivery",
            first_seen=now,
        )
        items.append(_sent("duplicate", vm.id, item, config.dup_copies))
    for i, vm in enumerate(rng.sample(list(estate.vms), min(config.poison_pills, len(estate.vms)))):
        pill = f"{POISON_HARD}-{i}" if i == 0 else f"{POISON_PILL}-{i}"  # the first one's handler fails too
        item = WorkItem(Trigger.MANUAL, vm_id=VmId.parse(vm.id), correlation_id=pill)
        items.append(_sent("poison-pill", vm.id, item, 1))
    if config.hostile:
        # Queue messages are input too: ids with a trailing newline or a control character inside
        # (recorded as malformed, never worked on), and attempts far past MAX_ATTEMPT (clamped) on
        # Linux VMs, first seen long ago (the deadline counts scheduled delays, not age: a deferred
        # one is retried, its retry sent with MAX_ATTEMPT, the attempt it is read back with).
        windows = [vm for vm in estate.vms if vm.os == "Windows"]
        for i, vm in enumerate(rng.sample(windows, min(2, len(windows)))):
            token = f"chaos-hostile-{uuid.uuid4().hex[:12]}"
            bad = vm.id + "\n" if i == 0 else vm.id.replace("/virtualMachines/", "/virtualMachines/\x07")
            body = json.dumps({"reason": "vm-created", "vmId": bad, "correlationId": token})
            items.append(Sent("hostile", token, token, 1, 0, body))
        linux = [vm for vm in estate.vms if vm.os != "Windows"]
        for i, vm in enumerate(rng.sample(linux, min(2, len(linux)))):
            huge = WorkItem(
                Trigger.MANUAL,
                vm_id=VmId.parse(vm.id),
                correlation_id=f"huge-attempt-{i}",
                first_seen="2020-01-01T00:00:00Z",
            ).to_dict()
            huge["attempt"] = MAX_ATTEMPT * 1000 + i
            items.append(Sent("huge-attempt", vm.id, f"huge-attempt-{i}", 1, 0, json.dumps(huge)))
    for i in range(config.malformed):
        token = f"chaos-malformed-{uuid.uuid4().hex[:12]}"
        body = (
            f"{token}: not a work item"
            if i % 2 == 0
            else json.dumps(
                {"reason": "vm-created", "vmId": f"/subscriptions/{token}", "correlationId": token}
            )
        )
        items.append(Sent("malformed", token, "", 1, 0, body))
    rng.shuffle(items)
    return items


def _sent(kind: str, target: str, item: WorkItem, copies: int) -> Sent:
    return Sent(kind, target, item.correlation_id, copies, 0, json.dumps(item.to_dict()))


# ------------------------------------------------------------------ one pass


@dataclass
class PassResult:
    name: str
    mode: str
    vms: int
    report: dict[str, Any]
    faults: dict[str, int]
    outcomes: dict[str, int]
    violations: dict[str, int]
    examples: dict[str, list[str]]


class ChaosPass:
    """One run of the queue path against one estate (audit or enforce)."""

    def __init__(
        self, name: str, mode: str, estate: Estate, config: ChaosConfig, azurite: Azurite, restarts: int
    ) -> None:
        self.name = name
        self.mode = mode
        self.estate = estate
        self.config = config
        self.azurite = azurite
        self.restarts = restarts
        self.table = "chaos" + uuid.uuid4().hex[:12]
        self.epoch = 0
        self.sent: list[Sent] = []
        self.sweeps: list[dict[str, Any]] = []
        self.timer_failures: Counter[str] = Counter()
        self.restart_times: list[float] = []
        self.recovered_at: float | None = None
        self.log_scans = 0
        self.drains: Counter[str] = Counter()
        self.rng = random.Random(f"{config.seed}:{name}")
        self.hooks = EngineHooks(config, lambda: self.epoch)
        self.injected: Counter[str] = Counter()  # hostile_input and out_of_scope inputs sent
        self.storm: dict[str, Any] = {}
        # The estate's last subscriptions are left out of the scope (out_of_scope).
        kept = max(1, len(estate.subscriptions) - config.outside_subscriptions)
        self.scope = tuple(estate.subscriptions[:kept])
        self._scoped = {sub.lower() for sub in self.scope}
        if mode == "enforce" and config.storm:
            self.hooks.plan = self._crash_plan()

    def _in_scope(self, vm_id: str) -> bool:
        vm = VmId.try_parse(vm_id)
        return vm is not None and vm.subscription_id.lower() in self._scoped

    def _crash_plan(self) -> dict[str, str]:
        """Which VMs' first invocation reaching each crash point is killed: remediable AVMA VMs for
        the remediation points, any other Windows VM in scope for the rest."""
        n = self.config.crashes_per_point
        ours = [vm for vm in self.estate.vms if self._in_scope(vm.id) and vm.os == "Windows"]
        avma = [vm for vm in ours if re.fullmatch(r"vm-avma-\d{5}", vm.name)]
        picked = self.rng.sample(avma, min(2 * n, len(avma)))
        rest = [vm for vm in ours if re.fullmatch(r"vm-kms-healthy-\d{5}", vm.name)]  # reach detection
        others = self.rng.sample(rest, min(2 * n, len(rest)))
        plan: dict[str, str] = {}
        for i, vm in enumerate(picked):
            plan[vm.key] = ("remediate", "accepted")[i % 2]
        for i, vm in enumerate(others):
            plan[vm.key] = ("detect", "acked")[i % 2]
        return plan

    def _say(self, text: str) -> None:
        print(f"[{self.name} {time.monotonic() - self._t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    async def run(self) -> PassResult:
        self._t0 = time.monotonic()
        simulator = SimulatorProcess if self.config.simulator_process else SimulatorThread
        with simulator(
            self.estate, latency_s=self.config.latency_s, token_lifetime_s=self.config.token_lifetime_s
        ) as sim:
            env = {
                **sim.env(),
                "AzureWebJobsStorage": self.azurite.connection_string,
                "REMEDIATION_MODE": self.mode,
                "LEDGER_TABLE": self.table,
                "DEFER_DELAY_SECONDS": str(self.config.defer_delay_s),
                "DEFER_DEADLINE_HOURS": str(
                    self.config.audit_defer_deadline_h
                    if self.mode == "audit"
                    else self.config.defer_deadline_h
                ),
                "RUN_COMMAND_TIMEOUT_SECONDS": str(self.config.run_command_timeout_s),
                "LOG_SCAN_OVERLAP_MINUTES": "0",
                "TARGET_SUBSCRIPTIONS": ",".join(self.scope),
                "MAX_TARGETS_PER_ALERT": str(self.config.max_targets_per_alert),
                "ARM_CALL_TIMEOUT_SECONDS": str(self.config.arm_call_timeout_s),
                "LEASE_SECONDS": str(self.config.lease_s),
            }
            saved = {key: os.environ.get(key) for key in env}
            os.environ.update(env)  # azure-identity's ManagedIdentityCredential reads os.environ
            self.env = env
            try:
                with self.hooks.installed():
                    return await self._run(sim)
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value

    async def _run(self, sim: SimulatorProcess | SimulatorThread) -> PassResult:
        await self._create_queues()
        work = QueueHost(
            self.azurite.connection_string,
            WORK_QUEUE,
            POISON_QUEUE,
            self._vm_check,
            config=self.config,
            epoch=lambda: self.epoch,
        )
        self.sim = sim
        poison = QueueHost(
            self.azurite.connection_string,
            POISON_QUEUE,
            POISON_POISON_QUEUE,
            self._poison,
            config=replace(self.config, workers=4),
            epoch=lambda: self.epoch,
        )
        self.hosts = (work, poison)
        stop_hosts, stop_timer = asyncio.Event(), asyncio.Event()
        runners = [
            asyncio.create_task(work.run(stop_hosts)),
            asyncio.create_task(poison.run(stop_hosts)),
            asyncio.create_task(self._log_scan_timer(stop_timer)),
            asyncio.create_task(self._drain_timer(stop_hosts)),
        ]
        finished = False
        try:
            await self._produce()
            stop_timer.set()
            self._say("all messages sent; draining")
            finished = await self._drained()
        finally:
            stop_timer.set()
            stop_hosts.set()
            await asyncio.gather(*runners)
        remaining = await self._remaining()
        self._say(f"done (drained: {finished}); reading the simulator and the ledger")
        evidence = {
            "state": sim.call("state_dump"),
            "runLogs": sim.call("run_logs"),
            "counters": sim.call("counters"),
            "faults": sim.call("faults"),
            "vanished": sim.call("vanished"),
            "graphQueries": sim.call("graph_queries"),
        }
        rows, states = await self._ledger_rows()
        return self._judge(evidence, rows, states, remaining, finished)

    async def _vm_check(self, body: str) -> None:
        """The ``vm_check`` function; a poison pill crashes its invocation, as a worker killed for
        memory or by the function timeout would, so that the host's poison path runs too."""
        if f'"correlationId": "{POISON_PILL}-' in body:
            raise RuntimeError("harness: this invocation crashed (poison pill)")
        vm = _body_vm(body)
        invocation = Invocation(vm, self.hooks.plan.get(vm, "") if vm else "")
        token = _INVOCATION.set(invocation)  # the task runs in a copy of this context
        try:
            task = asyncio.create_task(triggers.work(body, env=self.env))
        finally:
            _INVOCATION.reset(token)
        invocation.task = task
        try:
            outcomes = await task
        except asyncio.CancelledError:
            if invocation.killed:
                raise WorkerKilled(invocation.point) from None
            raise
        # The verdict is recorded, the lease released; the process dies before the ack.
        finished = any(o.kind.value in FINAL_KINDS for o in outcomes)
        if invocation.point == "acked" and finished and self.hooks.kill(invocation):
            raise WorkerKilled("acked")

    async def _poison(self, body: str) -> None:
        """The ``vm_check_poison`` function; the hard pill's handler crashes as well (poison_failure)."""
        if f'"correlationId": "{POISON_HARD}-' in body:
            raise RuntimeError("harness: the poison handler crashed on this message")
        await triggers.poison(body, env=self.env)

    async def _drain_timer(self, stop: asyncio.Event) -> None:
        """The last-resort drain's timer (``drain_last_resort``): what the poison handler could not record."""
        while not stop.is_set():
            try:
                report = await triggers.drain_last_resort(env=self.env, visibility_s=5)
                self.drains["runs"] += 1
                self.drains["recorded"] += int(report.get("recorded", 0))
            except Exception as error:  # noqa: BLE001 - the host: a timer invocation that raises failed; it fires again
                self.timer_failures[f"drain:{type(error).__name__}"] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.drain_every_s)

    # -------------------------------------------------------------- producing

    async def _produce(self) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        config = self.config
        if self.mode == "audit" and config.audit_poison_pills is not None:
            config = replace(config, poison_pills=config.audit_poison_pills)
        planned = plan_items(self.estate, config, self.rng, stamp)
        # The poison pills go in the last wave: in an earlier one the storage loss would cut their
        # path (five deliveries, the poison queue, the last resort) short, and nothing would show it.
        pills = [item for item in planned if item.kind == "poison-pill"]
        items = [item for item in planned if item.kind != "poison-pill"]
        waves: list[list[Sent]] = [items[i :: self.restarts + 1] for i in range(self.restarts + 1)]
        waves[-1].extend(pills)
        for wave, chunk in enumerate(waves):
            if wave > 0:
                await self._restart_storage()
            start = self.hosts[0].stats.succeeded
            # The harness's messages first, so that the ten copies of an item meet in one batch of
            # the host and race for the lease; then the sweep timer (after a restart: its recovery).
            queued = await self._send(chunk)
            await self._sweep()
            self._say(f"wave {wave}: sweep {self.sweeps[-1].get('enqueued')} + {queued} harness messages")
            if wave == self.restarts and self.mode == "enforce" and self.config.storm:
                await self._storm()
            if wave < self.restarts:
                target = int(self.config.restart_after * (self.sweeps[-1].get("enqueued", 0) + queued))
                last = time.monotonic()
                while self.hosts[0].stats.succeeded - start < target:
                    await asyncio.sleep(0.05)
                    if time.monotonic() - last > 5:
                        last = time.monotonic()
                        stats = self.hosts[0].stats
                        done = stats.succeeded - start
                        self._say(
                            f"waiting for {target} handled before the restart: {done} done,"
                            f" {self.hosts[0].in_flight} running, failures {dict(stats.failures)},"
                            f" receive errors {stats.receive_errors}"
                        )

    async def _sweep(self) -> None:
        """The sweep timer; a failed run (Resource Graph down, ledger gone) fires again shortly."""
        for _ in range(SWEEP_ATTEMPTS):
            try:
                self.sweeps.append(await triggers.sweep_scope(env=self.env))
            except Exception as error:  # noqa: BLE001 - the host: a timer invocation that raises failed; it fires again
                self.timer_failures[f"sweep:{type(error).__name__}"] += 1
                await asyncio.sleep(1.0)
            else:
                return
        self.sweeps.append({"enqueued": 0, "failed": True})  # judged as a crash loop

    async def _log_scan_timer(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await triggers.log_scan(env=self.env)
                self.log_scans += 1
            except Exception as error:  # noqa: BLE001 - the host: a timer invocation that raises failed; it fires again
                self.timer_failures[f"log_scan:{type(error).__name__}"] += 1
            with contextlib.suppress(TimeoutError):  # the next tick
                await asyncio.wait_for(stop.wait(), timeout=self.config.log_scan_every_s)

    async def _storm(self) -> None:
        """The last wave's storm, while the queue still works through its backlog: events for VMs
        out of scope and with hostile ids; the Table endpoint down for ``table_outage_s``; then
        Resource Graph throttled and alerts posted to the webhook while the Queue endpoint is down
        (the action group retries each 503), one of them an oversized fan-out."""
        config = self.config
        ours = [vm for vm in self.estate.vms if self._in_scope(vm.id)]
        outside = [vm for vm in self.estate.vms if not self._in_scope(vm.id)]
        windows = [vm for vm in ours if vm.os == "Windows" and not _opted_out(vm)]
        events = [(as_vm_write(load(EG_WRITE), vm.id), "out_of_scope") for vm in outside[:4]]
        events += [
            (as_vm_write(load(EG_WRITE), windows[0].id + "\n"), "hostile_input"),
            (
                as_vm_write(
                    load(EG_WRITE), windows[1].id.replace("/virtualMachines/", "/virtualMachines/\x1b")
                ),
                "hostile_input",
            ),
        ]
        queued_hostile = 0
        for event, fault in events:
            result = await triggers.on_vm_event(event, env=self.env)
            self.injected[fault] += 1
            if fault == "hostile_input":
                queued_hostile += len(result.items)
        self.storm["hostileEventsQueued"] = queued_hostile  # must be 0: ignored with a reason

        # The Table endpoint down while the queue works through the last wave's backlog (the
        # timers keep firing, so the outage meets the ledger whatever the machine's speed).
        # Only once the host is working through the backlog (invocations finishing), so that the
        # outage meets the ledger's traffic on a fast machine as on a slow one.
        started, waited = self.hosts[0].stats.succeeded, time.monotonic()
        # A counter the host bumps, polled for a few seconds at most.
        while self.hosts[0].stats.succeeded - started < 10 and time.monotonic() - waited < 30:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        self._say(f"storm: Table endpoint down for {config.table_outage_s:g} s")
        done = self.hosts[0].stats.invocations
        self.hooks.outage(self.azurite.table_port, "table_outage", config.table_outage_s)
        await asyncio.sleep(config.table_outage_s)
        self._say(
            f"storm: Table endpoint back; {self.hooks.refused['table_outage']} requests refused,"
            f" {self.hosts[0].stats.invocations - done} invocations started meanwhile,"
            f" {self.hosts[0].in_flight} running"
        )

        self.sim.call(
            "throttle_resource_graph", config.graph_throttle, 1, 1
        )  # 1 s quota reset, Retry-After 1
        hostnames = Counter(vm.hostname.lower() for vm in self.estate.vms)
        named = [vm for vm in windows if hostnames[vm.hostname.lower()] == 1][:3]
        alerts = [v2_alert(dimensions=[dim("Computer", vm.hostname)]) for vm in named]
        alerts.append(v2_alert(dimensions=[], configuration_items=[vm.id for vm in outside[:3]]))
        self.injected["out_of_scope"] += len(outside[:3])
        fan = [vm.id for vm in ours[: config.fan_out]]
        alerts.append(v2_alert(dimensions=[], configuration_items=fan))
        self.injected["hostile_input"] += 1
        self.hooks.outage(self.azurite.queue_port, "queue_outage", config.queue_outage_s)
        answers = await asyncio.gather(*(self._action_group(alert) for alert in alerts))
        self.storm["alerts"] = [
            {
                "status": status,
                "tries": tries,
                "accepted": answer.get("accepted"),
                "ignored": len(answer.get("ignored", [])),
            }
            for status, tries, answer in answers
        ]
        fan_answer = answers[-1][2]
        self.storm["fanOut"] = {
            "targets": len(fan),
            "accepted": fan_answer.get("accepted"),
            "cap": config.max_targets_per_alert,
        }
        self._say(f"storm: alerts {self.storm['alerts']}")

    async def _action_group(self, alert: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
        """An action group posting one alert: a 503 (or 408/429/504) is retried after Retry-After
        (compressed to ``alert_retry_s``), as action-groups.md says Azure Monitor does."""
        body = json.dumps(alert).encode()
        status, answer = 0, dict[str, Any]()
        for tries in range(1, 61):
            status, answer, _ = await triggers.on_alert(body, env=self.env)
            if status not in (408, 429, 503, 504):
                return status, tries, answer
            self.storm.setdefault("alert503", 0)
            self.storm["alert503"] += 1
            await asyncio.sleep(self.config.alert_retry_s)
        return status, 60, answer

    async def _send(self, chunk: list[Sent]) -> int:
        """Send every copy of every item (16 at a time); a storage hiccup is retried, never skipped."""

        async def send(queue: QueueClient, body: str) -> None:
            for _ in range(40):
                try:
                    await queue.send_message(body)
                except AzureError:
                    await asyncio.sleep(0.5)
                else:
                    return
            raise RuntimeError("cannot send to the queue")

        bodies = [item.body for item in chunk for _ in range(item.copies)]
        async with self._queue(WORK_QUEUE) as queue:
            for i in range(0, len(bodies), 16):
                await asyncio.gather(*(send(queue, body) for body in bodies[i : i + 16]))
        self.sent.extend(replace(item, epoch=self.epoch) for item in chunk)
        return len(bodies)

    async def _restart_storage(self) -> None:
        self._say("restarting Azurite (in memory: queues and ledger are lost)")
        await asyncio.to_thread(self.azurite.restart)
        self.epoch += 1
        self.restart_times.append(time.monotonic())
        # The deployment made the queues in Azure; after a loss, the platform (here, the harness)
        # makes them again. The engine re-creates its ledger table itself.
        await self._create_queues()
        self.recovered_at = time.monotonic()

    def _queue(self, name: str) -> QueueClient:
        return harness_queue(self.azurite.connection_string, name)

    async def _create_queues(self) -> None:
        """Make the queues, empty (an Azurite shared by several runs may hold an earlier one's)."""
        for name in (WORK_QUEUE, POISON_QUEUE, POISON_POISON_QUEUE):
            async with self._queue(name) as queue:
                for _ in range(50):
                    try:
                        await queue.create_queue()
                    except ResourceExistsError:
                        try:
                            await queue.clear_messages()
                        except AzureError:
                            await asyncio.sleep(0.2)
                            continue
                    except AzureError:
                        await asyncio.sleep(0.2)
                        continue
                    break

    async def _counts(self) -> dict[str, int | None]:
        counts: dict[str, int | None] = {}
        for name in (WORK_QUEUE, POISON_QUEUE, POISON_POISON_QUEUE):
            async with self._queue(name) as queue:
                try:
                    counts[name] = (await queue.get_queue_properties()).approximate_message_count
                except AzureError:
                    counts[name] = None
        return counts

    async def _drained(self) -> bool:
        """Wait until no message is left, visible or not, and nothing runs; False at the time bound."""
        quiet = 0
        last_report = time.monotonic()
        while time.monotonic() - self._t0 < self.config.time_bound_s:
            counts = await self._counts()
            busy = sum(host.in_flight for host in self.hosts)
            idle = counts[WORK_QUEUE] == 0 and counts[POISON_QUEUE] == 0 and counts[POISON_POISON_QUEUE] == 0
            if idle and busy == 0:
                quiet += 1
                if quiet >= 3:
                    return True
            else:
                quiet = 0
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                self._say(
                    f"queue {counts[WORK_QUEUE]}, poison {counts[POISON_QUEUE]},"
                    f" last resort {counts[POISON_POISON_QUEUE]}, running {busy}"
                )
            await asyncio.sleep(0.3)
        return False

    async def _remaining(self) -> dict[str, int]:
        counts = await self._counts()
        return {name: count or 0 for name, count in counts.items()}

    async def _ledger_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(history rows by target, state rows): the table read directly, not through the engine."""
        rows: list[dict[str, Any]] = []
        states: list[dict[str, Any]] = []
        async with TableClient.from_connection_string(self.azurite.connection_string, self.table) as table:
            async for entity in table.list_entities():
                if str(entity["PartitionKey"]).startswith("h-"):
                    rows.append(dict(entity))
                elif entity["PartitionKey"] == STATE_PARTITION:
                    states.append(dict(entity))
        return rows, states

    # -------------------------------------------------------------- judging

    def _judge(
        self,
        evidence: dict[str, Any],
        rows: list[dict[str, Any]],
        states: list[dict[str, Any]],
        remaining: dict[str, int],
        finished: bool,
    ) -> PassResult:
        violations: Counter[str] = Counter()
        examples: defaultdict[str, list[str]] = defaultdict(list)

        def violate(invariant: str, example: str) -> None:
            violations[invariant] += 1
            if len(examples[invariant]) < 5:
                examples[invariant].append(example[:1500])

        specs = {vm.key: vm for vm in self.estate.vms}
        by_target: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            by_target[_target_key(str(row.get("target", "")))].append(row)
        for history in by_target.values():
            history.sort(key=lambda r: str(r["RowKey"]), reverse=True)  # inverted ticks: oldest first

        # 1. Nothing lost.
        state: dict[str, dict[str, Any]] = evidence["state"]
        finals: dict[str, dict[str, Any]] = {}
        for key, history in by_target.items():
            decided = [r for r in history if r.get("reason") != "duplicate"]
            if decided:
                finals[key] = decided[-1]
        for vm_id, vm_state in state.items():
            if vm_state["os"] != "Windows" or not self._in_scope(vm_id):
                continue
            final = finals.get(vm_id.lower())
            if final is None:
                violate("lost", f"{vm_id}: no outcome in the ledger")
            elif final.get("outcome") not in FINAL_KINDS:
                violate("lost", f"{vm_id}: last record is {final.get('outcome')}: {final.get('reason')}")
        for key, final in finals.items():
            if final.get("outcome") not in FINAL_KINDS and key not in {k.lower() for k in state}:
                violate("lost", f"{key}: last record is {final.get('outcome')}: {final.get('reason')}")
        # From the producers' side: every message the harness sent, and every work item any producer
        # put on the queue (the sweep, the log scan, the webhook, Event Grid, the worker's own
        # retries), ends in a row of its own: an outcome, or an event (deferral, poison, not-found).
        # Intents are not answers: they are counted apart, never as a message handled.
        answered: Counter[tuple[str, str, int]] = Counter()
        answered_any: Counter[str] = Counter()
        for r in rows:
            if r.get("entry") not in ("outcome", "event"):
                continue
            target = _target_key(str(r.get("target", "")))
            if r.get("reason") == "poison" and r.get("target") == "last-resort-message":
                target = _target_key(str(_details(r).get("target", "")))
            if r.get("reason") == "ledger-unavailable":
                continue  # the engine's own count of carried copies: the queue's record counts them
            answered[(target, str(r.get("correlationId", "")), int(r.get("attempt", 0) or 0))] += 1
            answered_any[str(r.get("correlationId", ""))] += 1
        malformed_bodies = [
            str(_details(r).get("body", ""))
            for r in rows
            if r.get("reason") in ("malformed-message", "poison")
        ]
        last_epoch = self.epoch
        produced = [p for p in self.hooks.produced if p.epoch == last_epoch]
        # A delivery Table storage could not take ends in a recorded retry: the fresh copy the
        # worker put on the queue (shared/worker.py, ``ledgerMissed``), seen here as it was produced.
        # That copy is a message of its own, answered in turn.
        for p in produced:
            if p.carried:
                answered[(p.target, p.correlation, p.attempt)] += 1
                answered_any[p.correlation] += 1
        fanned = {p.correlation for p in produced if not p.target.startswith("computer:")}
        checked = Counter[str]()
        for item in self.sent:
            if item.epoch != last_epoch:
                continue
            checked[item.kind] += item.copies
            if item.kind in ("malformed", "hostile"):
                if not any(item.target in body for body in malformed_bodies):
                    violate("lost", f"{item.kind} message {item.target}: no ledger event")
            elif item.target.startswith("computer:") and item.correlation in fanned:
                continue  # resolved: its VMs' items were produced, and are judged below
            elif answered_any[item.correlation] < item.copies:
                violate(
                    "lost",
                    f"{item.kind} {item.target} ({item.correlation}): {item.copies} sent, "
                    f"{answered_any[item.correlation]} answered",
                )
        wanted = Counter((p.target, p.correlation, p.attempt) for p in produced)
        for (target, correlation, attempt), count in wanted.items():
            if answered[(target, correlation, attempt)] >= count:
                continue
            if target.startswith("computer:") and correlation in fanned:
                continue
            violate(
                "lost",
                f"produced {target} ({correlation}, attempt {attempt}) x{count}: "
                f"{answered[(target, correlation, attempt)]} answered",
            )
        poison_bodies = [str(_details(r).get("body", "")) for r in rows if r.get("reason") == "poison"]
        for epoch, body in self.hosts[0].stats.poisoned:
            if epoch == last_epoch and body[:1000] not in poison_bodies:
                violate("poisonUnrecorded", f"poison message without a ledger event: {body[:120]}")
        if remaining.get(POISON_POISON_QUEUE):
            violate(
                "poisonUnrecorded", f"{remaining[POISON_POISON_QUEUE]} poison messages failed their handler"
            )
        if not finished:
            violate("unfinished", f"time bound reached with {remaining} messages and work still running")

        # 2-5. From the simulator's own record.
        run_logs: dict[str, list[dict[str, Any]]] = evidence["runLogs"]
        cloud_hosts = KMS_HOSTS[self.estate.cloud]
        remediated_vms = 0
        for vm_id, entries in run_logs.items():
            spec = specs[vm_id.lower()]
            if _opted_out(spec):
                violate("touchedOptedOut", f"{vm_id}: {len(entries)} Run Commands on an opted-out VM")
            succeeded = 0
            for entry in entries:
                if entry["script"] == "remediate" and self.mode == "audit":
                    violate("changedInAudit", f"{vm_id}: a remediation Run Command in audit mode")
                if entry["script"] != "remediate" or not entry["ran"] or _changed_nothing(entry):
                    continue
                cause = _why_remediable(spec, entry, cloud_hosts)
                if cause is None:
                    violate("remediatedWithoutCause", f"{vm_id}: remediation on {entry['before']}")
                after = entry.get("after") or {}
                if after.get("channel") == "KMS_CLIENT" and after.get("licenseStatus") == 1:
                    succeeded += 1
            if succeeded > 1:
                violate("remediatedTwice", f"{vm_id}: {succeeded} successful remediations")
            remediated_vms += succeeded > 0
        remediated_rows = Counter(
            _target_key(str(r.get("target"))) for r in rows if r.get("outcome") == "remediated"
        )
        for key, count in remediated_rows.items():
            if count > 1:
                violate("remediatedTwice", f"{key}: {count} 'remediated' records in the ledger")
        counters = evidence["counters"]
        for vm_id, most in counters["maxConcurrentRunCommands"].items():
            if most > 1:
                violate("concurrentRunCommands", f"{vm_id}: {most} Run Commands at once")
        for vm_id, count in counters["liveConflicts"].items():
            violate("concurrentRunCommands", f"{vm_id}: {count} Run Commands sent while its own one ran")
        if self.mode == "audit":
            for vm_id, vm_state in state.items():
                if vm_state.get("changed"):
                    violate("changedInAudit", f"{vm_id}: licensing changed in audit mode")
            for key in remediated_rows:
                violate("changedInAudit", f"{key}: 'remediated' recorded in audit mode")

        # 6. The verdict agrees with the VM's real licensing (the simulator's state, not the engine's):
        # a VM still on AVMA is never recorded healthy or remediated, a licensed KMS client never
        # failed, whatever the reason. The one exemption is a VM that nothing could have looked at, by
        # the simulator's own record: its agent was down from the start of the pass to its end (the
        # estate's agentReady false; nothing in the run changes it), so the engine's failed:
        # deadline-exceeded:* (reached after every retry) is the truth. It is counted apart
        # (licensedUnobservable); any other failed reason of such a VM is not exempt.
        vanished = {k.lower() for k in evidence["vanished"]}
        state_by_key = {k.lower(): v for k, v in state.items()}
        verdicts: Counter[str] = Counter()
        unobservable: Counter[str] = Counter()
        for row in states:
            vm_id, verdict = str(row.get("vmId", "")), str(row.get("outcome") or "")
            real = state_by_key.get(vm_id.lower())
            if not verdict or real is None or vm_id.lower() in vanished:
                continue
            verdicts[verdict] += 1
            channel, licensed = real.get("channel"), real.get("licenseStatus") == 1
            story = _story(by_target.get(vm_id.lower(), []))
            if channel == "AVMA" and verdict in ("healthy", "remediated"):
                violate(
                    "verdict_vs_state",
                    f"{vm_id}: still on AVMA, recorded {verdict}: {row.get('reason')}; {story}",
                )
            elif channel == "KMS_CLIENT" and licensed and verdict == "failed":
                known = specs.get(vm_id.lower())
                reason = str(row.get("reason") or "")
                if known is not None and not known.agent_ready and reason.startswith("deadline-exceeded:"):
                    # only the deadline, after every retry: a failed at the first look (a down agent
                    # made terminal) or any other reason is the engine's, and a violation
                    unobservable[reason] += 1
                    continue
                violate(
                    "verdict_vs_state",
                    f"{vm_id}: a licensed KMS client, recorded failed: {row.get('reason')}; {story}",
                )

        # 7. Every Run Command the simulator ran is in the history: a remediation has an intent row
        # written before it, a detection an outcome (or intent, or poison row) of its VM after it.
        # Only commands started after the last storage loss count (the rows before it were lost).
        # The simulator's clock is CLOCK_MONOTONIC, as this process's is; rows carry wall time.
        offset = time.time() - time.monotonic()
        since = self.restart_times[-1] if self.restart_times else 0.0
        slack = 1.0
        for vm_id, entries in run_logs.items():
            if not self._in_scope(vm_id):
                for entry in entries:
                    violate("out_of_scope_run_commands", f"{vm_id}: a {entry['script']} Run Command")
                continue
            history = by_target.get(vm_id.lower(), [])
            intents = [_wall(r) for r in history if r.get("entry") == "intent"]
            answers = [
                _wall(r)
                for r in history
                if (r.get("entry") == "outcome" and r.get("reason") not in NO_WORKFLOW)
                or r.get("entry") == "intent"
                or r.get("reason") == "poison"
            ]
            for entry in entries:
                if entry["started"] < since:
                    continue
                at = entry["started"] + offset
                if entry["script"] == "remediate":
                    # Before it: the engine's clock at the write and the simulator's at the POST's
                    # arrival are one system clock, so only rounding separates them (a 1 s slack let
                    # an intent written half a second after the POST pass).
                    if not any(at - self.config.lease_s <= t <= at + INTENT_SLACK_S for t in intents):
                        violate("unrecorded_run_commands", f"{vm_id}: a remediation with no intent before it")
                elif not any(t >= at - slack for t in answers):
                    violate("unrecorded_run_commands", f"{vm_id}: a {entry['script']} with no row after it")

        # The worker must not crash-loop: storage errors must stop once storage is back.
        if self.recovered_at is not None:
            for at, name, message in self.hosts[0].stats.failure_times:
                if at > self.recovered_at + self.config.crash_grace_s and _storage_missing(name, message):
                    violate("crashLoop", f"{at - self.recovered_at:.1f} s after recovery: {name}: {message}")
        for sweep in self.sweeps:
            if sweep.get("failed"):
                violate("crashLoop", f"the sweep timer failed {SWEEP_ATTEMPTS} times in a row")

        outcomes = Counter(str(f.get("outcome")) for key, f in finals.items() if key.startswith("/"))
        records = Counter(str(r.get("outcome")) for r in rows)
        reasons = Counter(
            f"{f.get('outcome')}: {f.get('reason')}" for key, f in finals.items() if key.startswith("/")
        )
        work = self.hosts[0].stats
        sent_before = [s for s in self.sent if s.epoch < last_epoch]
        done_before = {c for epoch, c in work.completed_correlations if epoch < last_epoch and c}
        report = {
            "vms": len(self.estate.vms),
            "windowsVms": sum(vm.os == "Windows" for vm in self.estate.vms),
            "messages": {
                "sweeps": [s.get("enqueued") for s in self.sweeps],
                "harness": dict(Counter(s.kind for s in self.sent for _ in range(s.copies))),
                "checkedAfterLastRestart": dict(checked),
            },
            "invocations": {
                "total": work.invocations,
                "succeeded": work.succeeded,
                "failed": dict(work.failures),
                "failureSamples": {
                    name: [f"{at - self._t0:.1f}s {m}" for at, n, m in work.failure_times if n == name][:3]
                    for name in work.failures
                },
                "poisoned": len(work.poisoned),
                "lostAcks": work.lost_acks,
                "receiveErrors": work.receive_errors,
                "poisonHandler": self.hosts[1].stats.invocations,
            },
            "timers": {"logScans": self.log_scans, "failures": dict(self.timer_failures)},
            "storageLoss": {
                "restarts": len(self.restart_times),
                "harnessItemsBefore": len(sent_before),
                "harnessItemsHandledBefore": sum(1 for s in sent_before if s.correlation in done_before),
            },
            "armRequests": counters["requests"],
            "remediatedVms": remediated_vms,
            "records": dict(records),
            "vanishedVms": len(evidence["vanished"]),
            "reasons": dict(reasons.most_common()),
            "remaining": remaining,
            "verdicts": dict(verdicts),
            "licensedUnobservable": dict(unobservable),
            "crashes": dict(Counter(point for _, _, point in self.hooks.kills)),
            "killedInvocations": dict(work.killed),
            "storm": self.storm,
            "lastResortDrain": dict(self.drains),
            "produced": len(produced),
            "scope": {
                "subscriptions": len(self.scope),
                "outside": len(self.estate.subscriptions) - len(self.scope),
            },
            "wallS": round(time.monotonic() - self._t0, 1),
        }
        faults = dict(evidence["faults"])
        faults[RESTART_FAULT] = len(self.restart_times)
        faults["worker_crash"] = len(self.hooks.kills)
        faults["table_outage"] = self.hooks.refused["table_outage"]
        faults["queue_outage"] = self.hooks.refused["queue_outage"]
        faults["graph_throttle"] = sum(1 for q in evidence["graphQueries"] if q.get("status") == 429)
        faults["poison_failure"] = sum(self.hosts[1].stats.failures.values())
        faults["hostile_input"] = self.injected["hostile_input"] + sum(
            s.copies for s in self.sent if s.kind in ("hostile", "huge-attempt")
        )
        faults["out_of_scope"] = self.injected["out_of_scope"] + sum(
            s.copies for s in self.sent if s.target.startswith("/") and not self._in_scope(s.target)
        )
        return PassResult(
            self.name,
            self.mode,
            len(self.estate.vms),
            report,
            faults,
            dict(outcomes),
            dict(violations),
            examples,
        )


# An intent row's time may follow its remediation's start by no more than this (clock rounding).
INTENT_SLACK_S = 0.1


def _story(history: list[dict[str, Any]], most: int = 14) -> str:
    """A VM's last history rows, oldest first, for a violation's example: when (wall clock, s
    before the last row), what, and the attempt, so that a wrong verdict shows how it was reached."""
    rows = history[-most:]
    if not rows:
        return "no history"
    end = _wall(rows[-1])
    parts = [
        f"-{end - _wall(r):.0f}s {r.get('outcome')}:{r.get('reason')}@{r.get('attempt', 0)}"
        f"{'/' + str(r.get('correlationId'))[:24] if r.get('correlationId') else ''}"
        for r in rows
    ]
    return "history " + ", ".join(parts)


def _storage_missing(name: str, message: str) -> bool:
    """An invocation failed because a table or queue is missing (the signature of a crash loop
    after a storage loss), as opposed to storage being slow or briefly unreachable."""
    return name in ("TableMissing", "QueueMissing") or (
        name in STORAGE_ERRORS and any(s in message for s in ("does not exist", "NotFound"))
    )


def _wall(row: Mapping[str, Any]) -> float:
    at = row.get("at")
    return at.timestamp() if isinstance(at, datetime) else 0.0


def _body_vm(body: str) -> str:
    """The VM key a message names ("" for a computer name or a body that is no work item)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    vm = VmId.try_parse(data.get("vmId")) if isinstance(data, dict) else None
    return str(vm).lower() if vm is not None else ""


def _target_key(target: str) -> str:
    vm = VmId.try_parse(target)
    return str(vm).lower() if vm is not None else target.strip().lower()


def _details(row: Mapping[str, Any]) -> dict[str, Any]:
    try:
        value = json.loads(str(row.get("details") or "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _opted_out(spec: VmSpec) -> bool:
    return any(
        name.lower() == OPT_OUT_TAG and value.strip().lower() not in ("false", "no", "0")
        for name, value in spec.tags.items()
    )


def _changed_nothing(entry: Mapping[str, Any]) -> bool:
    """A conditional re-key (the first Run Command of a VM whose edition ARM names, issue 12) that
    found other facts than it was given: it only read them, so the guest's licensing before and after
    it are the same. One that changed anything is judged as any remediation."""
    conditional = "ExpectBuild" in (entry.get("parameters") or {})
    return conditional and entry.get("before") == entry.get("after")


def _why_remediable(spec: VmSpec, entry: Mapping[str, Any], azure_kms: frozenset[str]) -> str | None:
    """The decision table, written again from the safety rules alone, on the state the guest had
    when the remediation script ran: a reason when it was allowed, None when it was not."""
    before = entry.get("before") or {}
    install_key = entry["parameters"].get("InstallKey")
    if spec.os != "Windows" or spec.guest is None or _opted_out(spec):
        return None
    if str(before.get("editionId", "")).lower() == "serverrdsh" or before.get("sku") == 175:
        return None  # multi-session: never re-keyed, never touched
    channel = before.get("channel")
    if channel == "AVMA" and install_key == "1":
        known = key_for("KMS_CLIENT", str(before.get("editionId")), spec.guest.build) is not None
        return "avma-channel" if known else None
    if channel == "KMS_CLIENT" and install_key == "0" and before.get("licenseStatus") != 1:
        host = before.get("kmsHost")
        if host is None or str(host).split(":", 1)[0].lower() in azure_kms:
            return "kms-client-unlicensed"
    return None


# ------------------------------------------------------------------ the whole run


def build_estate(config: ChaosConfig, count: int, seed: int) -> Estate:
    subscriptions = config.subscriptions + config.outside_subscriptions
    estate = Estate.generate(count=count, seed=seed, mix=config.mix, subscriptions=subscriptions)
    return estate.with_faults(FaultPlan.from_dict({"seed": seed, **config.faults}))


def start_azurite() -> Azurite:
    """A private Azurite (in memory, free ports): the run restarts it, which loses all its data."""
    blob, queue, table = _free_ports(3)
    azurite = Azurite(blob, queue, table, binary=azurite_binary())
    azurite.start()
    return azurite


async def run_chaos(config: ChaosConfig, *, azurite: Azurite | None = None) -> dict[str, Any]:
    """Both passes; the report whose JSON is the last line of ``bench/chaos.py``.

    Each run has an Azurite of its own (in memory, restarted by the run), unless ``azurite`` is
    given: then the run uses it (restarting it if the config says so: nothing else may rely on its
    data) and leaves it running."""
    started = time.monotonic()
    own = azurite is None
    if azurite is None:
        azurite = start_azurite()
    elif config.restarts and not azurite.owned:
        raise ValueError("a run that restarts Azurite needs one it started (not AZURITE_CONNECTION_STRING)")
    passes: list[PassResult] = []
    try:
        if config.audit_vms:
            audit = build_estate(config, config.audit_vms, config.seed + 1)
            passes.append(await ChaosPass("audit", "audit", audit, config, azurite, restarts=0).run())
        if config.vms:
            enforce = build_estate(config, config.vms, config.seed)
            passes.append(
                await ChaosPass(
                    "enforce", "enforce", enforce, config, azurite, restarts=config.restarts
                ).run()
            )
    finally:
        if own:
            azurite.close()
    faults = Counter(dict.fromkeys((*KINDS, RESTART_FAULT, *HARNESS_FAULTS), 0))
    violations = Counter(
        dict.fromkeys(
            (
                "lost",
                "remediatedWithoutCause",
                "touchedOptedOut",
                "concurrentRunCommands",
                "changedInAudit",
                "remediatedTwice",
                "poisonUnrecorded",
                "unfinished",
                "crashLoop",
                "verdict_vs_state",
                "unrecorded_run_commands",
                "out_of_scope_run_commands",
            ),
            0,
        )
    )
    for result in passes:
        faults.update(result.faults)
        violations.update(result.violations)
    enforce_pass = next((p for p in passes if p.mode == "enforce"), None)
    return {
        "vms": config.vms,
        "auditVms": config.audit_vms,
        "faults": dict(faults),
        "outcomes": enforce_pass.outcomes if enforce_pass else {},
        "remediatedVms": enforce_pass.report["remediatedVms"] if enforce_pass else 0,
        "violations": dict(violations),
        "wallS": round(time.monotonic() - started, 1),
        "passes": {
            p.name: {
                "mode": p.mode,
                "faults": p.faults,
                "outcomes": p.outcomes,
                "violations": p.violations,
                "examples": p.examples,
                **p.report,
            }
            for p in passes
        },
        "settings": {
            "seed": config.seed,
            "workers": config.workers,
            "latencyS": config.latency_s,
            "dupShare": config.dup_share,
            "dupCopies": config.dup_copies,
            "restarts": config.restarts,
            "deferDelayS": config.defer_delay_s,
            "deferDeadlineH": config.defer_deadline_h,
            "runCommandTimeoutS": config.run_command_timeout_s,
            "faults": dict(config.faults),
        },
    }


def parse_args(argv: list[str] | None = None) -> ChaosConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = ChaosConfig()
    p.add_argument("--vms", type=int, default=base.vms, help="VMs of the enforce pass")
    p.add_argument("--audit-vms", type=int, default=base.audit_vms, help="VMs of the audit pass (0: none)")
    p.add_argument("--seed", type=int, default=base.seed)
    p.add_argument("--workers", type=int, default=base.workers, help="invocations at once")
    p.add_argument("--latency", type=float, default=base.latency_s, help="simulated Run Command duration, s")
    p.add_argument("--dup-share", type=float, default=base.dup_share, help="share of VMs sent again")
    p.add_argument("--dup-copies", type=int, default=base.dup_copies, help="identical copies of each")
    p.add_argument("--restarts", type=int, default=base.restarts, help="Azurite restarts in the enforce pass")
    p.add_argument("--time-bound", type=float, default=base.time_bound_s, help="seconds per pass at most")
    p.add_argument("--fault", action="append", default=[], metavar="KIND=VALUE", help="override a fault")
    p.add_argument("--no-faults", action="store_true", help="turn every simulator fault off")
    p.add_argument("--report-out", metavar="FILE", help="also write the whole report (both passes) here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    faults: dict[str, Any] = {} if args.no_faults else dict(DEFAULT_FAULTS)
    if args.fault:
        faults = FaultPlan.from_dict(faults).with_options(args.fault).to_dict()
        faults.pop("seed", None)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR, stream=sys.stderr)
    logging.getLogger("azure").setLevel(logging.CRITICAL)
    return replace(
        base,
        report_out=args.report_out,
        vms=args.vms,
        audit_vms=args.audit_vms,
        seed=args.seed,
        workers=args.workers,
        latency_s=args.latency,
        dup_share=args.dup_share,
        dup_copies=args.dup_copies,
        restarts=args.restarts,
        time_bound_s=args.time_bound,
        faults=faults,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    report = asyncio.run(run_chaos(config))
    if config.report_out:
        Path(config.report_out).write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    for name, result in report["passes"].items():
        for invariant, found in result["examples"].items():
            for example in found:
                print(f"[{name}] violation {invariant}: {example}", file=sys.stderr)
    keys = ("vms", "auditVms", "faults", "outcomes", "remediatedVms", "violations", "wallS")
    print(json.dumps({k: report[k] for k in keys}))
    return 1 if any(report["violations"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
