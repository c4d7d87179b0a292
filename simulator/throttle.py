"""ARM's and Resource Graph's request budgets, as documented, in the simulator's compressed time.

ARM (MicrosoftDocs/azure-docs ``articles/azure-resource-manager/management/request-limits-and-throttling.md``,
learn.microsoft.com "Understand how Azure Resource Manager throttles requests", 2025): in the public
cloud since 2024 every subscription has, per region and per principal, a **token bucket** for each
kind of operation: reads 250 tokens refilled at 25/s, writes 200 at 10/s, deletes 200 at 10/s. The
sovereign clouds keep the older **hourly** limits (reads 12,000, writes 1,200, deletes 15,000 per
hour; the same page's hourly table, and docs.azure.cn's copy of it). Every answer carries the
remaining budget of its kind (``x-ms-ratelimit-remaining-subscription-reads``/``-writes``/``-deletes``);
a request that finds its budget empty is 429 with ``Retry-After``.

Resource Graph (``articles/governance/resource-graph/concepts/guidance-for-throttled-requests.md``):
a quota per user, "15 queries within every 5-second window" in its example; every answer carries
``x-ms-user-quota-remaining`` and ``x-ms-user-quota-resets-after`` (``hh:mm:ss``); a query beyond the
quota is 429 ``RateLimiting``.

Time is compressed in the simulator (a Run Command takes ``latency_s`` instead of Azure's 20 s or
more), so the budgets refill ``timeScale`` times faster than in Azure (sizes and limits unchanged).
The default, ``"auto"``, is ``20 s / latency_s``: ARM's budget then weighs against the work exactly
as in Azure (generous for tests and the demo, whose Run Commands are a fraction of a second).
``timeScale: 1`` is ARM's budget in wall-clock seconds, stricter than Azure relative to compressed
Run Commands: the benchmark uses it to make the budget the wall. Everything is in docs/simulator.md.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from simulator.estate import DEFAULT_LOCATION, EstateError

KINDS: Final = ("reads", "writes", "deletes")
MODELS: Final = ("tokenBucket", "hourly", "off")
# The public cloud's buckets: (size, refill per second) (request-limits-and-throttling.md, 2025).
PUBLIC_BUCKETS: Final[Mapping[str, tuple[int, float]]] = {
    "reads": (250, 25.0),
    "writes": (200, 10.0),
    "deletes": (200, 10.0),
}
# The sovereign clouds' limits per hour (the same page's "Throttling for non-public clouds" table).
HOURLY_LIMITS: Final[Mapping[str, int]] = {"reads": 12_000, "writes": 1_200, "deletes": 15_000}
HOUR_S: Final = 3600.0
# Resource Graph's quota per user: (queries, window in seconds) (guidance-for-throttled-requests.md).
GRAPH_QUOTA: Final = (15, 5.0)
# The Run Command duration the "auto" time scale stands for (README: "Azure takes 20 s or more").
AZURE_RUN_COMMAND_S: Final = 20.0
MAX_TIME_SCALE: Final = 1e6
# The model of each cloud when the estate does not name one.
CLOUD_MODELS: Final[Mapping[str, str]] = {
    "AzureCloud": "tokenBucket",
    "AzureUSGovernment": "hourly",
    "AzureChinaCloud": "hourly",
}
_REGION = re.compile(r"^[a-z0-9]{2,40}$")


def operation_kind(method: str) -> str:
    """ARM's kind of a request: ``GET``/``HEAD`` read, ``DELETE`` delete, anything else a write."""
    method = method.upper()
    if method in ("GET", "HEAD"):
        return "reads"
    return "deletes" if method == "DELETE" else "writes"


def remaining_header(kind: str) -> str:
    return f"x-ms-ratelimit-remaining-subscription-{kind}"


@dataclass(frozen=True, slots=True)
class ThrottleSettings:
    """The estate's ``throttling`` section (docs/simulator.md, "Throttling"); the default is ARM's
    documented model of the estate's cloud at the ``auto`` time scale, and Resource Graph's quota."""

    model: str | None = None  # tokenBucket | hourly | off; None: the cloud's (CLOUD_MODELS)
    time_scale: float | None = None  # None: auto (AZURE_RUN_COMMAND_S / latency_s)
    region: str = DEFAULT_LOCATION  # the region of the ARM front end the client reaches
    buckets: Mapping[str, tuple[int, float]] = field(default_factory=lambda: dict(PUBLIC_BUCKETS))
    hourly: Mapping[str, int] = field(default_factory=lambda: dict(HOURLY_LIMITS))
    graph: tuple[int, float] | None = GRAPH_QUOTA  # None: no quota

    def resolved_model(self, cloud: str) -> str:
        return self.model or CLOUD_MODELS.get(cloud, "tokenBucket")

    def resolved_scale(self, latency_s: float) -> float:
        if self.time_scale is not None:
            return self.time_scale
        if latency_s <= 0:
            return MAX_TIME_SCALE
        return min(MAX_TIME_SCALE, max(1.0, AZURE_RUN_COMMAND_S / latency_s))

    @property
    def is_default(self) -> bool:
        return self == ThrottleSettings()

    def to_dict(self) -> dict[str, Any]:
        """The estate file's ``throttling`` section (only what differs from the defaults)."""
        out: dict[str, Any] = {}
        if self.model is not None:
            out["model"] = self.model
        if self.time_scale is not None:
            out["timeScale"] = self.time_scale
        if self.region != DEFAULT_LOCATION:
            out["region"] = self.region
        for kind in KINDS:
            if self.buckets[kind] != PUBLIC_BUCKETS[kind] or self.hourly[kind] != HOURLY_LIMITS[kind]:
                entry: dict[str, Any] = {}
                if self.buckets[kind] != PUBLIC_BUCKETS[kind]:
                    entry.update(size=self.buckets[kind][0], perSecond=self.buckets[kind][1])
                if self.hourly[kind] != HOURLY_LIMITS[kind]:
                    entry["perHour"] = self.hourly[kind]
                out[kind] = entry
        if self.graph != GRAPH_QUOTA:
            out["resourceGraph"] = (
                "off" if self.graph is None else {"queries": self.graph[0], "windowSeconds": self.graph[1]}
            )
        return out

    @classmethod
    def from_dict(cls, data: object, path: str = "$.throttling") -> ThrottleSettings:
        """Validate an estate file's ``throttling`` section; raise :class:`EstateError` naming the path."""
        if not isinstance(data, dict):
            raise EstateError(path, "expected an object")
        allowed = ("model", "timeScale", "region", *KINDS, "resourceGraph")
        for key in data:
            if key not in allowed:
                raise EstateError(f"{path}.{key}", f"unknown key (allowed: {', '.join(allowed)})")
        settings = cls()
        if "model" in data:
            model = data["model"]
            if model not in MODELS:
                raise EstateError(f"{path}.model", f"expected one of {', '.join(MODELS)}")
            settings = replace(settings, model=model)
        if "timeScale" in data and data["timeScale"] != "auto":
            scale = _number(data["timeScale"], f"{path}.timeScale", low=0.001, high=MAX_TIME_SCALE)
            settings = replace(settings, time_scale=scale)
        if "region" in data:
            region = data["region"]
            if not isinstance(region, str) or not _REGION.match(region):
                raise EstateError(f"{path}.region", "not an Azure region name")
            settings = replace(settings, region=region)
        buckets, hourly = dict(settings.buckets), dict(settings.hourly)
        for kind in KINDS:
            if kind not in data:
                continue
            entry, where = data[kind], f"{path}.{kind}"
            if not isinstance(entry, dict):
                raise EstateError(where, "expected an object {size, perSecond, perHour}")
            for key in entry:
                if key not in ("size", "perSecond", "perHour"):
                    raise EstateError(f"{where}.{key}", "unknown key (allowed: size, perSecond, perHour)")
            if ("size" in entry) != ("perSecond" in entry):
                raise EstateError(where, "give size and perSecond together")
            if "size" in entry:
                size = int(_number(entry["size"], f"{where}.size", low=1, high=1e9, whole=True))
                buckets[kind] = (size, _number(entry["perSecond"], f"{where}.perSecond", low=0.001, high=1e9))
            if "perHour" in entry:
                per_hour = _number(entry["perHour"], f"{where}.perHour", low=1, high=1e12, whole=True)
                hourly[kind] = int(per_hour)
        settings = replace(settings, buckets=buckets, hourly=hourly)
        if "resourceGraph" in data:
            settings = replace(settings, graph=_graph(data["resourceGraph"], f"{path}.resourceGraph"))
        return settings

    def with_options(self, options: Iterable[str]) -> ThrottleSettings:
        """These settings with ``simulator serve --throttle KEY=VALUE`` options applied:
        ``model=hourly``, ``timeScale=1`` (or ``auto``), ``region=eastus``,
        ``reads=SIZE/PER_SECOND``, ``writes=perHour:1200``, ``resourceGraph=QUERIES/SECONDS`` (or ``off``)."""
        data = self.to_dict()
        for option in options:
            key, sep, value = option.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise EstateError("--throttle", f"expected KEY=VALUE: {option[:80]!r}")
            if key in ("model", "region"):
                data[key] = value
            elif key == "timeScale":
                data[key] = value if value == "auto" else _float(value, option)
            elif key in KINDS:
                entry = dict(data.get(key, {}))
                if value.startswith("perHour:"):
                    entry["perHour"] = _float(value.removeprefix("perHour:"), option)
                else:
                    size, slash, rate = value.partition("/")
                    if not slash:
                        raise EstateError(
                            "--throttle", f"expected {key}=SIZE/PER_SECOND or perHour:N: {option[:80]!r}"
                        )
                    entry.update(size=_float(size, option), perSecond=_float(rate, option))
                data[key] = {k: _whole(v) if k != "perSecond" else v for k, v in entry.items()}
            elif key == "resourceGraph":
                if value == "off":
                    data[key] = "off"
                else:
                    queries, slash, window = value.partition("/")
                    if not slash:
                        raise EstateError(
                            "--throttle", f"expected resourceGraph=QUERIES/SECONDS or off: {option[:80]!r}"
                        )
                    data[key] = {
                        "queries": _whole(_float(queries, option)),
                        "windowSeconds": _float(window, option),
                    }
            else:
                raise EstateError(
                    "--throttle",
                    f"unknown key {key[:40]!r} "
                    f"(known: model, timeScale, region, {', '.join(KINDS)}, resourceGraph)",
                )
        return ThrottleSettings.from_dict(data, "--throttle")


def _whole(value: Any) -> Any:
    """A whole float as an int, so that validation accepts ``--throttle reads=250/25``."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _float(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise EstateError("--throttle", f"not a number: {option[:80]!r}") from None


def _number(value: object, path: str, *, low: float, high: float, whole: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EstateError(path, "expected a number")
    if whole and not float(value).is_integer():
        raise EstateError(path, "expected a whole number")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise EstateError(path, f"{value} is out of range [{low:g}, {high:g}]")
    return number


def _graph(value: object, path: str) -> tuple[int, float] | None:
    if value == "off":
        return None
    if not isinstance(value, dict) or set(value) != {"queries", "windowSeconds"}:
        raise EstateError(path, 'expected {"queries", "windowSeconds"} or "off"')
    queries = int(_number(value["queries"], f"{path}.queries", low=1, high=1e9, whole=True))
    return queries, _number(value["windowSeconds"], f"{path}.windowSeconds", low=0.001, high=86_400.0)


@dataclass(frozen=True, slots=True)
class ArmVerdict:
    """What ARM's budget says about one request: the header to send, and a wait when refused."""

    allowed: bool
    header: str
    remaining: int
    retry_after_s: float
    kind: str


@dataclass(frozen=True, slots=True)
class GraphVerdict:
    """What Resource Graph's quota says about one query."""

    allowed: bool
    remaining: int
    resets_after_s: float

    def headers(self) -> dict[str, str]:
        return {
            "x-ms-user-quota-remaining": str(self.remaining),
            "x-ms-user-quota-resets-after": hms(self.resets_after_s),
        }


def hms(seconds: float) -> str:
    """``hh:mm:ss``, the format of ``x-ms-user-quota-resets-after``, rounded up to whole seconds."""
    whole = max(0, math.ceil(seconds - 1e-9))
    return f"{whole // 3600:02}:{whole % 3600 // 60:02}:{whole % 60:02}"


class _Bucket:
    """A token bucket: ``size`` tokens at most, ``per_s`` back per (compressed) second."""

    def __init__(self, size: int, per_s: float, now: float) -> None:
        self.size, self.per_s, self.tokens, self.last = size, per_s, float(size), now

    def take(self, now: float) -> tuple[bool, int, float]:
        self.tokens = min(float(self.size), self.tokens + (now - self.last) * self.per_s)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True, int(self.tokens), 0.0
        return False, 0, (1.0 - self.tokens) / self.per_s


class _Window:
    """A fixed window: ``limit`` requests, counted from the window's first request, then a reset."""

    def __init__(self, limit: int, length_s: float) -> None:
        self.limit, self.length_s, self.used, self.ends = limit, length_s, 0, -math.inf

    def take(self, now: float) -> tuple[bool, int, float]:
        if now >= self.ends:
            self.used, self.ends = 0, now + self.length_s
        if self.used < self.limit:
            self.used += 1
            return True, self.limit - self.used, self.ends - now
        return False, 0, self.ends - now


class Throttle:
    """The budgets of one simulator; thread-safe. ``arm`` and ``graph`` return None when off."""

    def __init__(
        self,
        settings: ThrottleSettings | None = None,
        *,
        cloud: str = "AzureCloud",
        latency_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or ThrottleSettings()
        self.model = self.settings.resolved_model(cloud)
        self.time_scale = self.settings.resolved_scale(latency_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._arm: dict[tuple[str, str, str], _Bucket | _Window] = {}
        self._graph: dict[str, _Window] = {}
        self._requests: Counter[tuple[str, str]] = Counter()
        self._throttled: Counter[tuple[str, str]] = Counter()
        self._graph_requests = 0
        self._graph_throttled = 0

    def arm(self, subscription: str, method: str) -> ArmVerdict | None:
        """Take one token of the subscription's budget for this request's kind."""
        if self.model == "off":
            return None
        kind = operation_kind(method)
        key = (subscription.lower(), self.settings.region, kind)
        with self._lock:
            now = self._clock()
            budget = self._arm.get(key)
            if budget is None:
                if self.model == "hourly":
                    budget = _Window(self.settings.hourly[kind], HOUR_S / self.time_scale)
                else:
                    size, per_s = self.settings.buckets[kind]
                    budget = _Bucket(size, per_s * self.time_scale, now)
                self._arm[key] = budget
            allowed, remaining, wait = budget.take(now)
            self._requests[(key[0], kind)] += 1
            if not allowed:
                self._throttled[(key[0], kind)] += 1
        return ArmVerdict(allowed, remaining_header(kind), remaining, wait if not allowed else 0.0, kind)

    def graph(self, principal: str = "") -> GraphVerdict | None:
        """Count one Resource Graph query against the principal's quota window."""
        quota = self.settings.graph
        if quota is None:
            return None
        with self._lock:
            now = self._clock()
            window = self._graph.get(principal)
            if window is None:
                window = self._graph[principal] = _Window(quota[0], quota[1] / self.time_scale)
            allowed, remaining, resets = window.take(now)
            self._graph_requests += 1
            if not allowed:
                self._graph_throttled += 1
        return GraphVerdict(allowed, remaining, resets)

    def stats(self) -> dict[str, Any]:
        """Requests counted and 429s given: per subscription and kind for ARM, in all for Resource Graph."""
        with self._lock:
            arm: dict[str, dict[str, dict[str, int]]] = {}
            for (sub, kind), count in sorted(self._requests.items()):
                arm.setdefault(sub, {})[kind] = {"requests": count, "throttled": self._throttled[(sub, kind)]}
            return {
                "model": self.model,
                "timeScale": self.time_scale,
                "region": self.settings.region,
                "arm": arm,
                "armThrottled": sum(self._throttled.values()),
                "graph": {"requests": self._graph_requests, "throttled": self._graph_throttled},
            }
