"""Sweep benchmark: a generated estate in the simulator, the real engine and SDK, figures on stdout.

The simulator runs in its own process (as Azure would be elsewhere), so the engine's figures are
its own: wall time, ARM requests per VM, 429s, peak RSS. ARM's budgets are on in the simulator,
with the public cloud's sizes and refill rates in wall-clock seconds (``--time-scale 1``, the
default: docs/simulator.md, "Throttling"), so the floor a run is measured against is the larger of
the Run Command bound and the ARM-budget bound of the requests it made. The same estate is then
run as an admin's sequential loop would (one VM at a time, ARM listing per subscription), on a
sample of ``--sequential-sample`` VMs of the same recipe, and extrapolated per VM, for the speed-up.
The last line printed is one JSON object (docs/performance.md lists its keys).

    python bench/sweep.py --vms 10000 --subscriptions 20 --avma-fraction 0.05 --latency 1 --concurrency 128
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import cProfile
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is sys.path[0], where a module named as a standard one would shadow it
# (bench/queue.py did, before it became bench/queue_path.py): the repository's root goes there instead.
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]

from azure.core.pipeline import PipelineRequest  # noqa: E402
from azure.core.rest import HttpRequest  # noqa: E402

from shared.azure.compute import ComputeGateway  # noqa: E402
from shared.azure.credentials import make_credential  # noqa: E402
from shared.azure.inventory import Inventory  # noqa: E402
from shared.azure.pacing import PUBLIC_REFILL, Pacer  # noqa: E402
from shared.azure.transport import RequestCounter  # noqa: E402
from shared.model import Outcome, OutcomeKind, VmId  # noqa: E402
from shared.settings import Mode, Settings  # noqa: E402
from shared.sweep import sweep, sweep_inventory  # noqa: E402
from shared.vm import VmFacts  # noqa: E402
from shared.workflow import BeforeRunCommand, Remediator  # noqa: E402
from simulator.throttle import PUBLIC_BUCKETS  # noqa: E402

T = TypeVar("T")

# The VM whose workflow the current task runs (set around each check), for per-VM counts.
CURRENT_VM: contextvars.ContextVar[str | None] = contextvars.ContextVar("bench_vm", default=None)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vms", type=int, default=2000)
    p.add_argument("--subscriptions", type=int, default=2, help="subscriptions the VMs are spread over")
    p.add_argument("--avma-fraction", type=float, default=0.05)
    p.add_argument("--latency", type=float, default=1.0, help="simulated Run Command duration, seconds")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--audit", action="store_true", help="audit mode (default: apply)")
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="ARM's budget refill relative to Azure's, per wall second (1: ARM's own numbers)",
    )
    p.add_argument(
        "--pacer-knows-scale",
        action="store_true",
        help="tell the pacer the simulated refill (ARM's documented one × --time-scale)",
    )
    p.add_argument(
        "--sequential-sample",
        type=int,
        default=40,
        help="VMs of the same recipe run one at a time for the speed-up (0: skip)",
    )
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="write a cProfile of the engine's sweep (this process; not the sequential sample) to FILE",
    )
    p.add_argument(
        "--profile-simulator",
        metavar="FILE",
        help="run the sweep's simulator under cProfile, writing its profile to FILE when it stops",
    )
    return p.parse_args()


# ``python -c`` this FILE ARGS...: ``python -m shared ARGS...`` under a CPU-time cProfile written to FILE.
_PROFILED_SIMULATOR = """
import cProfile, runpy, sys, time
out = sys.argv.pop(1)
sys.argv[0] = "shared"
profiler = cProfile.Profile(time.process_time)
profiler.enable()
try:
    runpy.run_module("shared", run_name="__main__", alter_sys=True)
finally:
    profiler.disable()
    profiler.dump_stats(out)
"""


def start_simulator(
    estate_path: Path, latency: float, *, profile: str | None = None
) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Start ``avma-remediator simulator serve`` (under cProfile, writing to ``profile``, if given:
    SIGTERM ends it cleanly, so the profile is written) and read the settings it prints."""
    run_module = ["-c", _PROFILED_SIMULATOR, str(Path(profile).resolve())] if profile else ["-m", "shared"]
    proc = subprocess.Popen(
        [
            sys.executable,
            *run_module,
            "simulator",
            "serve",
            str(estate_path),
            "--latency",
            str(latency),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    env: dict[str, str] = {}
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if line.startswith("export "):
            key, _, value = line[len("export ") :].strip().partition("=")
            env[key] = value
        if line.startswith("# Ctrl-C") or time.monotonic() > deadline:
            break
    if "ARM_ENDPOINT" not in env:
        proc.kill()
        raise SystemExit("the simulator did not start")
    return proc, env


class PerVmCounter(RequestCounter):
    """Every ARM request, and per VM whose workflow sent it."""

    def __init__(self) -> None:
        super().__init__()
        self.by_vm: Counter[str] = Counter()

    def on_request(self, request: PipelineRequest[HttpRequest]) -> None:
        super().on_request(request)
        vm = CURRENT_VM.get()
        if vm is not None:
            self.by_vm[vm] += 1


class BenchGateway(ComputeGateway):
    """The engine's gateway, counting requests and Run Commands per VM (benchmark only)."""

    def __init__(self, credential: Any, settings: Settings, *, refill_scale: float | None = None) -> None:
        super().__init__(credential, settings)
        self.counter = PerVmCounter()
        self._counter = self.counter  # the clients are made later, with this counter in their pipeline
        self.commands_by_vm: Counter[str] = Counter()
        if refill_scale is not None:
            # The pacer told the simulated ARM's refill (ARM's documented one × the time scale), as
            # the engine knows Azure's; without it a time scale below 1 is an ARM stricter than
            # documented, which the pacer learns from its 429s.
            refill = {kind: rate * refill_scale for kind, rate in PUBLIC_REFILL.items()}
            self.pacer = Pacer(cloud=settings.cloud.name, concurrency=settings.max_concurrency, refill=refill)

    async def run_command(self, vm_id: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        self.commands_by_vm[str(vm_id).lower()] += 1
        return await super().run_command(vm_id, body)


class Tagged:
    """The remediator, with the VM in a context variable around each check."""

    def __init__(self, remediator: Remediator) -> None:
        self._remediator = remediator

    async def check(
        self,
        vm_id: VmId,
        *,
        listed: VmFacts | None = None,
        before_run_command: BeforeRunCommand | None = None,
    ) -> Outcome:
        token = CURRENT_VM.set(str(vm_id).lower())
        try:
            return await self._remediator.check(vm_id, listed=listed, before_run_command=before_run_command)
        finally:
            CURRENT_VM.reset(token)


def _recipe(args: argparse.Namespace, count: int, subscriptions: int) -> dict[str, Any]:
    return {
        "generate": {
            "count": count,
            "seed": args.seed,
            "subscriptions": subscriptions,
            "mix": {"avma": args.avma_fraction},
        },
        "throttling": {"timeScale": args.time_scale},
    }


def arm_budget_floor(
    sent: Mapping[tuple[str, str], int], refused: Mapping[tuple[str, str], int], scale: float
) -> float:
    """The shortest time ARM's buckets allow for the requests the run needed (those it sent less the
    429s), every subscription refilling in parallel: per subscription and kind, what exceeds the
    bucket, at the refill rate."""
    floor = 0.0
    for key, count in sent.items():
        size, per_s = PUBLIC_BUCKETS[key[1]]
        needed = count - refused.get(key, 0)
        floor = max(floor, max(0, needed - size) / (per_s * scale))
    return floor


async def run(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    os.environ.update(env)
    settings = Settings.from_env(os.environ).with_mode(Mode.AUDIT if args.audit else Mode.ENFORCE)
    # As the CLI's --concurrency does: the pacer's per-subscription limit grows back to it.
    settings = replace(settings, max_concurrency=args.concurrency)
    credential = make_credential(settings)
    started = time.monotonic()
    cpu_started = _cpu_s()
    async with (
        credential,
        BenchGateway(
            credential, settings, refill_scale=args.time_scale if args.pacer_knows_scale else None
        ) as gateway,
        Inventory(credential, settings) as inv,
    ):
        report = await sweep_inventory(
            Tagged(Remediator(gateway, settings)),
            inv,
            concurrency=args.concurrency,
            limit=gateway.pacer.concurrency,
        )
        graph_throttled = inv.throttled
    wall = time.monotonic() - started
    cpu = _cpu_s() - cpu_started
    outcomes = Counter(o.kind.value for o in report.outcomes)
    fixed = [o.vm_id.lower() for o in report.outcomes if o.kind is OutcomeKind.REMEDIATED]
    healthy = [o.vm_id.lower() for o in report.outcomes if o.kind is OutcomeKind.HEALTHY]
    chains = any(o.details.get("action") is not None for o in report.outcomes)
    longest_chain = args.latency * (2 if chains else 1)
    run_command_bound = max(gateway.run_commands * args.latency / args.concurrency, longest_chain)
    pacer = gateway.pacer
    arm_bound = arm_budget_floor(pacer.sent, pacer.refused, args.time_scale)
    floor = max(run_command_bound, arm_bound)
    vms = max(1, len(report.outcomes))
    arm_throttled = sum(pacer.throttled.values())
    listing_queries = inv.queries
    return {
        "vms": len(report.outcomes),
        "subscriptions": args.subscriptions,
        "run_commands": gateway.run_commands,
        "wall_s": round(wall, 2),
        "lower_bound_s": round(run_command_bound, 2),
        "arm_budget_bound_s": round(arm_bound, 2),
        "floor_s": round(floor, 2),
        "ratio": round(wall / floor, 3),
        "throttled": arm_throttled + graph_throttled,
        "throttled_share": round((arm_throttled + graph_throttled) / max(1, gateway.requests), 5),
        "arm_requests_per_vm": round(gateway.requests / vms, 2),
        "arm_requests_per_healthy_vm": _mean(gateway.counter.by_vm[vm] for vm in healthy),
        "arm_requests_per_fixed_vm": _mean(gateway.counter.by_vm[vm] for vm in fixed),
        "listing_requests_per_vm": round(listing_queries / vms, 4),
        "run_commands_per_fixed_vm": _mean(gateway.commands_by_vm[vm] for vm in fixed),
        "pacing_wait_s": round(pacer.waited_s, 1),
        "engine_cpu_s": round(cpu, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "outcomes": dict(outcomes),
        "listing_errors": len(report.listing_errors),
    }


async def _profiled(work: Awaitable[T], path: str | None) -> T:
    """Await ``work``, under cProfile when ``path`` is given (the profile is written there)."""
    if path is None:
        return await work
    profiler = cProfile.Profile(time.process_time)  # CPU, not wall time: the machine is shared
    profiler.enable()
    try:
        return await work
    finally:
        profiler.disable()
        profiler.dump_stats(path)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu_s() -> float:
    """CPU of the child processes waited for so far (the simulator, once it has ended)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _mean(values: Any) -> float | None:
    items = list(values)
    return round(sum(items) / len(items), 2) if items else None


async def run_sequential(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """An admin's loop: list each subscription through ARM, then one VM at a time."""
    os.environ.update(env)
    settings = Settings.from_env(os.environ).with_mode(Mode.AUDIT if args.audit else Mode.ENFORCE)
    credential = make_credential(settings)
    started = time.monotonic()
    async with credential, ComputeGateway(credential, settings) as gateway:
        report = await sweep(
            Remediator(gateway, settings), gateway.list_vms, settings.subscriptions, concurrency=1
        )
    wall = time.monotonic() - started
    return {"sample_vms": len(report.outcomes), "sample_s": round(wall, 2)}


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        estate_path = Path(tmp) / "estate.json"
        estate_path.write_text(json.dumps(_recipe(args, args.vms, args.subscriptions)))
        proc, env = start_simulator(estate_path, args.latency, profile=args.profile_simulator)
        children = _children_cpu_s()
        try:
            figures = asyncio.run(_profiled(run(args, env), args.profile))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        figures["simulator_cpu_s"] = round(_children_cpu_s() - children, 1)
        if args.sequential_sample > 0:
            sample_path = Path(tmp) / "sample.json"
            sample_subs = max(1, min(args.subscriptions, args.sequential_sample))
            sample_path.write_text(json.dumps(_recipe(args, args.sequential_sample, sample_subs)))
            proc, env = start_simulator(sample_path, args.latency)
            try:
                sequential = asyncio.run(run_sequential(args, env))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            per_vm = sequential["sample_s"] / max(1, sequential["sample_vms"])
            estimate = per_vm * figures["vms"]
            figures["sequential"] = {
                **sequential,
                "per_vm_s": round(per_vm, 3),
                "estimate_s": round(estimate, 1),
            }
            figures["speedup"] = round(estimate / figures["wall_s"], 1)
    print(
        f"{figures['vms']} VMs over {args.subscriptions} subscriptions, "
        f"{figures['run_commands']} Run Commands in {figures['wall_s']} s (floor {figures['floor_s']} s: "
        f"Run Commands {figures['lower_bound_s']} s, ARM budget {figures['arm_budget_bound_s']} s); "
        f"{figures['throttled']} throttled; outcomes {figures['outcomes']}",
        file=sys.stderr,
    )
    print(json.dumps({"concurrency": args.concurrency, "latency_s": args.latency, **figures}))


if __name__ == "__main__":
    main()
