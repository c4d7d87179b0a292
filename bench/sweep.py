"""Sweep benchmark: a generated estate in the simulator, the real engine and SDK, figures on stdout.

The simulator runs in its own process (as Azure would be elsewhere), so the engine's figures are
its own: wall time, ARM requests per VM, peak RSS. The last line printed is one JSON object.

    python bench/sweep.py --vms 2000 --avma-fraction 0.05 --latency 1 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.azure.compute import ComputeGateway  # noqa: E402
from shared.azure.credentials import make_credential  # noqa: E402
from shared.settings import Mode, Settings  # noqa: E402
from shared.sweep import sweep  # noqa: E402
from shared.workflow import Remediator  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vms", type=int, default=2000)
    p.add_argument("--avma-fraction", type=float, default=0.05)
    p.add_argument("--latency", type=float, default=1.0, help="simulated Run Command duration, seconds")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--audit", action="store_true", help="audit mode (default: apply)")
    return p.parse_args()


def start_simulator(estate_path: Path, latency: float) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Start ``avma-remediator simulator serve`` and read the settings it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared", "simulator", "serve", str(estate_path), "--latency", str(latency)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    env: dict[str, str] = {}
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
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


async def run(args: argparse.Namespace, env: dict[str, str]) -> dict[str, object]:
    os.environ.update(env)
    settings = Settings.from_env(os.environ).with_mode(Mode.AUDIT if args.audit else Mode.ENFORCE)
    credential = make_credential(settings)
    started = time.monotonic()
    async with credential, ComputeGateway(credential, settings) as gateway:
        remediator = Remediator(gateway, settings)
        report = await sweep(
            remediator, gateway.list_vms, settings.subscriptions, concurrency=args.concurrency
        )
    wall = time.monotonic() - started
    outcomes = Counter(o.kind.value for o in report.outcomes)
    chains = Counter(o.details.get("action") is not None for o in report.outcomes)
    longest_chain = args.latency * (2 if chains[True] else 1)
    lower = max(gateway.run_commands * args.latency / args.concurrency, longest_chain)
    return {
        "vms": len(report.outcomes),
        "run_commands": gateway.run_commands,
        "wall_s": round(wall, 2),
        "lower_bound_s": round(lower, 2),
        "ratio": round(wall / lower, 3),
        "arm_requests_per_vm": round(gateway.requests / max(1, len(report.outcomes)), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "outcomes": dict(outcomes),
        "listing_errors": len(report.listing_errors),
    }


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        estate_path = Path(tmp) / "estate.json"
        estate_path.write_text(
            json.dumps(
                {"generate": {"count": args.vms, "seed": args.seed, "mix": {"avma": args.avma_fraction}}}
            )
        )
        proc, env = start_simulator(estate_path, args.latency)
        try:
            figures = asyncio.run(run(args, env))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(
        f"{figures['vms']} VMs, {figures['run_commands']} Run Commands in {figures['wall_s']} s "
        f"(lower bound {figures['lower_bound_s']} s); outcomes {figures['outcomes']}",
        file=sys.stderr,
    )
    print(json.dumps({"concurrency": args.concurrency, "latency_s": args.latency, **figures}))


if __name__ == "__main__":
    main()
