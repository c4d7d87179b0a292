"""Fault injection: Azure misbehaving on purpose, each kind on a rate or a schedule, from a seed.

A fault plan is part of the estate (its ``faults`` section, docs/simulator.md) or comes from
``avma-remediator simulator serve --fault KIND=VALUE``. The simulator asks the injector at each
*opportunity* of a kind (every ARM request, every accepted Run Command, every token request …)
whether to misbehave, and counts every fault it actually injected per kind: ``sim.faults()`` is
the simulator's own record, independent of what the engine under test believes happened.

ARM throttling (the ``armThrottling`` kind) is not a rate but a model of the throttle a client
cannot see coming in ARM's subscription budget: the Compute resource provider's own policies
("Troubleshooting API throttling errors", MicrosoftDocs/SupportArticles-docs
``support/azure/virtual-machines/windows/troubleshooting-throttling-errors.md``, formerly
MicrosoftDocs/azure-docs ``articles/virtual-machines/troubleshooting/troubleshooting-throttling-errors.md``):
per subscription, a per-minute policy per operation group (``Microsoft.Compute/LowCostGet3Min``,
``HighCostGet3Min``, ``PutVM3Min`` …), each a token bucket here (reads' or writes' size and refill,
by default ARM's numbers: Compute publishes none), refilled ``timeScale`` times faster than in
Azure because the simulator's time is compressed. Its remainder shows only in
``x-ms-ratelimit-remaining-resource``, never in the ``x-ms-ratelimit-remaining-subscription-*``
headers (ARM's documented budget, simulator/throttle.py), so a client pacing on those meets its
429s and must back off.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from simulator.estate import EstateError

THROTTLING: Final = "armThrottling"
# Kinds decided per opportunity (a rate or a schedule), in the order the docs list them.
SCHEDULED: Final = (
    "serverError",  # every ARM request (compute and Resource Graph): 500 or 503
    "runCommandBusy",  # every Run Command POST that would be accepted: 409 Conflict
    "operationFailed",  # every accepted Run Command: the operation ends Failed
    "runCommandHang",  # every accepted Run Command: runs for ``seconds`` instead of the latency
    "vmVanish",  # every detection that completes: the VM is then deleted or deallocated
    "agentFlap",  # every Windows VM, once at start: its agent alternates Ready / Not Ready
    "outputTruncated",  # every successful Run Command: trailing output pushes it past 4,096 bytes
    "outputGarbled",  # every successful Run Command: some bytes are not valid UTF-8 any more
    "tokenError",  # every managed-identity token request: 500
    "logPartialError",  # every Log Analytics query: partial result (half the rows + PartialError)
)
KINDS: Final = (THROTTLING, *SCHEDULED)

# The policies' buckets by default: ARM's sizes and refill (azure-facts.md 6.2; Compute publishes
# no numbers for its own): (bucket size, refill per second).
ARM_READS: Final = (250, 25.0)
ARM_WRITES: Final = (200, 10.0)
DEFAULT_HANG_S: Final = 10.0
DEFAULT_FLAP_PERIOD_S: Final = 1.0
DEFAULT_AFTER_ACCEPT: Final = 0.5
# Kind-specific options (besides rate / every / burst) and their range.
_OPTIONS: Final[Mapping[str, Mapping[str, tuple[float, float]]]] = {
    "serverError": {"afterAccept": (0.0, 1.0)},
    # Run Command's documented maximum run time is 90 minutes, then it times out (run-command.md).
    "runCommandHang": {"seconds": (0.001, 5_400.0)},
    "agentFlap": {"periodSeconds": (0.001, 86_400.0)},
}
_EVENT_LOG_SIZE: Final = 20_000


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a kind fires: with probability ``rate`` per opportunity, or on every ``every``-th one
    (then ``burst`` opportunities in a row end each period: ``every=150, burst=5`` fails requests
    146-150, 296-300, …, which outlasts a client's retries)."""

    rate: float = 0.0
    every: int = 0
    burst: int = 1

    @property
    def active(self) -> bool:
        return self.rate > 0 or self.every > 0

    def fires(self, opportunity: int, rng: random.Random) -> bool:
        """``opportunity`` counts from 1."""
        if self.every:
            return (opportunity - 1) % self.every >= self.every - self.burst
        return self.rate > 0 and rng.random() < self.rate

    def to_json(self) -> float | dict[str, int]:
        if self.every:
            return {"every": self.every, "burst": self.burst} if self.burst != 1 else {"every": self.every}
        return self.rate


@dataclass(frozen=True, slots=True)
class Throttling:
    """The buckets of Compute's policies (each GET policy with ``reads``, each write policy with
    ``writes``); refill per wall-clock second = ``per_second × time_scale``; sizes as given."""

    time_scale: float
    reads: tuple[int, float] = ARM_READS
    writes: tuple[int, float] = ARM_WRITES

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"timeScale": self.time_scale}
        if self.reads != ARM_READS:
            out["reads"] = {"size": self.reads[0], "perSecond": self.reads[1]}
        if self.writes != ARM_WRITES:
            out["writes"] = {"size": self.writes[0], "perSecond": self.writes[1]}
        return out


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Which faults are on; the empty plan (the default) injects nothing."""

    seed: int = 0
    throttling: Throttling | None = None
    schedules: Mapping[str, Schedule] = field(default_factory=dict)
    hang_seconds: float = DEFAULT_HANG_S
    flap_period_s: float = DEFAULT_FLAP_PERIOD_S
    after_accept: float = DEFAULT_AFTER_ACCEPT  # share of 5xx answers to a Run Command it accepted

    @property
    def enabled(self) -> bool:
        return self.throttling is not None or any(s.active for s in self.schedules.values())

    def schedule(self, kind: str) -> Schedule:
        return self.schedules.get(kind, Schedule())

    def to_dict(self) -> dict[str, Any]:
        """The estate file's ``faults`` section for this plan."""
        out: dict[str, Any] = {"seed": self.seed}
        if self.throttling is not None:
            out[THROTTLING] = self.throttling.to_json()
        for kind in SCHEDULED:
            schedule = self.schedule(kind)
            if not schedule.active:
                continue
            value: Any = schedule.to_json()
            extra: dict[str, Any] = {}
            if kind == "serverError" and self.after_accept != DEFAULT_AFTER_ACCEPT:
                extra["afterAccept"] = self.after_accept
            if kind == "runCommandHang" and self.hang_seconds != DEFAULT_HANG_S:
                extra["seconds"] = self.hang_seconds
            if kind == "agentFlap" and self.flap_period_s != DEFAULT_FLAP_PERIOD_S:
                extra["periodSeconds"] = self.flap_period_s
            if extra:
                value = {**({"rate": value} if isinstance(value, float) else value), **extra}
            out[kind] = value
        return out

    @classmethod
    def from_dict(cls, data: object, path: str = "$.faults") -> FaultPlan:
        """Validate an estate file's ``faults`` section; raise :class:`EstateError` naming the path."""
        if not isinstance(data, dict):
            raise EstateError(path, "expected an object")
        for key in data:
            if key != "seed" and key not in KINDS:
                raise EstateError(f"{path}.{key}", f"unknown fault kind (known: seed, {', '.join(KINDS)})")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise EstateError(f"{path}.seed", "expected a whole number")
        plan = cls(seed=seed)
        if THROTTLING in data:
            plan = replace(plan, throttling=_throttling(data[THROTTLING], f"{path}.{THROTTLING}"))
        schedules: dict[str, Schedule] = {}
        for kind in SCHEDULED:
            if kind not in data:
                continue
            schedule, options = _schedule(data[kind], f"{path}.{kind}", _OPTIONS.get(kind, {}))
            schedules[kind] = schedule
            if "afterAccept" in options:
                plan = replace(plan, after_accept=options["afterAccept"])
            if "seconds" in options:
                plan = replace(plan, hang_seconds=options["seconds"])
            if "periodSeconds" in options:
                plan = replace(plan, flap_period_s=options["periodSeconds"])
        return replace(plan, schedules=schedules)

    def with_options(self, options: Iterable[str], *, seed: int | None = None) -> FaultPlan:
        """This plan with ``KIND=VALUE`` command-line options applied (see :func:`parse_option`)."""
        data = self.to_dict()
        for option in options:
            kind, value = parse_option(option)
            data[kind] = value
        if seed is not None:
            data["seed"] = seed
        return FaultPlan.from_dict(data, "--fault")


def parse_option(text: str) -> tuple[str, Any]:
    """``KIND=RATE`` (``serverError=0.02``), ``KIND=every:N[:burst:B]`` (``tokenError=every:150:burst:5``),
    ``armThrottling=TIMESCALE``; ``KIND=0`` or ``KIND=off`` turns a kind off."""
    kind, sep, value = text.partition("=")
    kind, value = kind.strip(), value.strip()
    if not sep or kind not in KINDS:
        raise EstateError(
            "--fault", f"expected KIND=VALUE with KIND one of {', '.join(KINDS)}: {text[:80]!r}"
        )
    if kind == THROTTLING:
        if value in ("0", "off"):
            return kind, {"timeScale": 0}
        return kind, {"timeScale": _float_text(value, text)}
    if value == "off":
        return kind, 0.0
    if value.startswith("every:"):
        parts = value.split(":")
        if len(parts) not in (2, 4) or (len(parts) == 4 and parts[2] != "burst"):
            raise EstateError("--fault", f"expected every:N or every:N:burst:B: {text[:80]!r}")
        schedule: dict[str, Any] = {"every": _int_text(parts[1], text)}
        if len(parts) == 4:
            schedule["burst"] = _int_text(parts[3], text)
        return kind, schedule
    return kind, _float_text(value, text)


def _float_text(value: str, text: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise EstateError("--fault", f"not a number: {text[:80]!r}") from None
    return number


def _int_text(value: str, text: str) -> int:
    if not value.isdigit():
        raise EstateError("--fault", f"not a whole number: {text[:80]!r}")
    return int(value)


def _number(value: object, path: str, *, low: float, high: float, whole: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EstateError(path, "expected a number")
    if whole and not isinstance(value, int):
        raise EstateError(path, "expected a whole number")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise EstateError(path, f"{value} is out of range [{low:g}, {high:g}]")
    return number


def _schedule(
    value: object, path: str, extras: Mapping[str, tuple[float, float]]
) -> tuple[Schedule, dict[str, float]]:
    if not isinstance(value, dict):
        return Schedule(rate=_number(value, path, low=0.0, high=1.0)), {}
    allowed = {"rate", "every", "burst", *extras}
    for key in value:
        if key not in allowed:
            raise EstateError(f"{path}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
    if ("rate" in value) == ("every" in value):
        raise EstateError(path, "give exactly one of rate or every")
    options = {
        key: _number(value[key], f"{path}.{key}", low=low, high=high)
        for key, (low, high) in extras.items()
        if key in value
    }
    if "rate" in value:
        if "burst" in value:
            raise EstateError(f"{path}.burst", "burst goes with every, not with rate")
        return Schedule(rate=_number(value["rate"], f"{path}.rate", low=0.0, high=1.0)), options
    every = int(_number(value["every"], f"{path}.every", low=1, high=1e9, whole=True))
    burst = int(_number(value.get("burst", 1), f"{path}.burst", low=1, high=1e9, whole=True))
    if burst > every:
        raise EstateError(f"{path}.burst", f"{burst} is more than every ({every})")
    return Schedule(every=every, burst=burst), options


def _bucket(value: object, path: str) -> tuple[int, float]:
    if not isinstance(value, dict) or set(value) != {"size", "perSecond"}:
        raise EstateError(path, "expected {size, perSecond}")
    size = int(_number(value["size"], f"{path}.size", low=1, high=1e9, whole=True))
    return size, _number(value["perSecond"], f"{path}.perSecond", low=0.001, high=1e9)


def _throttling(value: object, path: str) -> Throttling | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = {"timeScale": value}
    if not isinstance(value, dict):
        raise EstateError(path, "expected an object {timeScale, reads?, writes?}")
    for key in value:
        if key not in ("timeScale", "reads", "writes"):
            raise EstateError(f"{path}.{key}", "unknown key (allowed: reads, timeScale, writes)")
    if "timeScale" not in value:
        raise EstateError(f"{path}.timeScale", "required key is missing")
    scale = _number(value["timeScale"], f"{path}.timeScale", low=0.0, high=1e6)
    if scale == 0:
        return None  # off
    reads = _bucket(value["reads"], f"{path}.reads") if "reads" in value else ARM_READS
    writes = _bucket(value["writes"], f"{path}.writes") if "writes" in value else ARM_WRITES
    return Throttling(time_scale=scale, reads=reads, writes=writes)


class TokenBucket:
    """One bucket: ``size`` tokens at most, ``per_s`` tokens back per wall-clock second."""

    def __init__(self, size: int, per_s: float, now: float) -> None:
        self.size = size
        self.per_s = per_s
        self.tokens = float(size)
        self.last = now

    def take(self, now: float) -> tuple[bool, int, float]:
        """(allowed, tokens left, seconds until one is back)."""
        self.tokens = min(float(self.size), self.tokens + (now - self.last) * self.per_s)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True, int(self.tokens), 0.0
        return False, 0, (1.0 - self.tokens) / self.per_s


# Compute's policies are per-minute windows ("…3Min"): a window of Azure's 180 s, in compressed time.
POLICY_WINDOW_S: Final = 180.0
COMPUTE: Final = "Microsoft.Compute"


@dataclass(frozen=True, slots=True)
class ThrottleAnswer:
    """What a Compute policy's bucket said about one request: its remainder, and a wait when refused.

    ``allowed_count`` and ``measured`` are the throttling error's details (what the policy allows in
    one window, and the requests it counted in the current one, from ``window_start`` to
    ``window_end``, wall-clock epoch seconds)."""

    allowed: bool
    policy: str  # e.g. LowCostGet3Min (shown as Microsoft.Compute/LowCostGet3Min)
    remaining: int
    retry_after_s: float
    allowed_count: int = 0
    measured: int = 0
    window_start: float = 0.0
    window_end: float = 0.0

    @property
    def header(self) -> str:
        """``x-ms-ratelimit-remaining-resource``'s value: ``<source RP>/<policy>;<count>``."""
        return f"{COMPUTE}/{self.policy};{self.remaining}"


@dataclass(slots=True)
class _Window:
    """The requests a policy counted in its current window (tumbling, ``POLICY_WINDOW_S`` of Azure's time)."""

    start: float
    wall_start: float
    count: int = 0


class FaultInjector:
    """Decides and counts faults; safe to call from any thread."""

    def __init__(self, plan: FaultPlan | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.plan = plan or FaultPlan()
        self._clock = clock
        self._lock = threading.Lock()
        self._rngs = {kind: random.Random(f"{self.plan.seed}:{kind}") for kind in SCHEDULED}
        self._seen: Counter[str] = Counter()
        self._injected: Counter[str] = Counter()
        self._events: deque[dict[str, Any]] = deque(maxlen=_EVENT_LOG_SIZE)
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._windows: dict[tuple[str, str], _Window] = {}

    def fire(self, kind: str, target: str = "", detail: str = "", *, record: bool = True) -> bool:
        """One opportunity of ``kind``: True when the fault is injected now (counted unless ``record``
        is False, for a kind whose injections are counted where they show, with :meth:`note`)."""
        schedule = self.plan.schedule(kind)
        if not schedule.active:
            return False
        with self._lock:
            self._seen[kind] += 1
            hit = schedule.fires(self._seen[kind], self._rngs[kind])
            if hit and record:
                self._note(kind, target, detail)
        return hit

    def draw(self, kind: str) -> float:
        """A deterministic number in [0, 1) from the kind's own stream (for a fault's details)."""
        with self._lock:
            return self._rngs[kind].random()

    def note(self, kind: str, target: str = "", detail: str = "") -> None:
        """Count a fault decided elsewhere (a 429 of the buckets, an agent seen flapping)."""
        with self._lock:
            self._note(kind, target, detail)

    def _note(self, kind: str, target: str, detail: str) -> None:
        self._injected[kind] += 1
        self._events.append({"kind": kind, "target": target, "detail": detail, "at": self._clock()})

    def throttle(self, subscription: str, policy: str, *, write: bool) -> ThrottleAnswer | None:
        """Take a token from the bucket of Compute's ``policy`` in the subscription (reads' or
        writes' size and refill); None when throttling is off."""
        spec = self.plan.throttling
        if spec is None:
            return None
        size, per_s = spec.writes if write else spec.reads
        window_s = POLICY_WINDOW_S / spec.time_scale
        with self._lock:
            now = self._clock()
            key = (subscription.lower(), policy)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(size, per_s * spec.time_scale, now)
            window = self._windows.get(key)
            if window is None or now - window.start >= window_s:
                window = self._windows[key] = _Window(now, time.time())
            window.count += 1
            allowed, remaining, wait = bucket.take(now)
            if not allowed:
                self._note(THROTTLING, subscription, policy)
            return ThrottleAnswer(
                allowed,
                policy,
                remaining,
                wait,
                allowed_count=int(size + per_s * POLICY_WINDOW_S),
                measured=window.count,
                window_start=window.wall_start,
                window_end=window.wall_start + window_s,
            )

    def counts(self) -> dict[str, int]:
        """Faults injected so far, per kind (every kind listed, 0 when none)."""
        with self._lock:
            return {kind: self._injected[kind] for kind in KINDS}

    def opportunities(self) -> dict[str, int]:
        with self._lock:
            return {kind: self._seen[kind] for kind in SCHEDULED}

    def events(self) -> list[dict[str, Any]]:
        """The most recent injected faults (kind, target, detail, monotonic time), oldest first."""
        with self._lock:
            return [dict(event) for event in self._events]
