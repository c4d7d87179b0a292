"""Queue-path benchmark: work items through the real function code, Azurite and the simulator.

The sweep timer's own code (``shared.triggers.sweep_scope``: Resource Graph, then the queue) puts
one work item per Windows VM of a generated estate on the ``vm-checks`` queue in Azurite; a host
loop then plays the Functions host (host.json: receive, run ``function_app``'s ``vm_check`` at most
``--concurrency`` at a time, delete on success) until the queue is empty. The simulator runs in a
process of its own (``SimulatorProcess``), Azurite in another (``tests/azurite.py``), so the figures
are the worker's own. The last line printed is one JSON object:

    python bench/queue_path.py --vms 1000 --avma-fraction 0.05 --latency 1 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from azure.storage.queue import TextBase64DecodePolicy, TextBase64EncodePolicy  # noqa: E402
from azure.storage.queue.aio import QueueClient  # noqa: E402

import function_app  # noqa: E402
from shared import triggers  # noqa: E402
from shared.clients import close_shared_clients, shared_clients  # noqa: E402
from shared.settings import WORK_QUEUE, Settings  # noqa: E402
from simulator import Estate  # noqa: E402
from simulator.process import SimulatorProcess  # noqa: E402
from tests.azurite import start_azurite  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vms", type=int, default=1000)
    p.add_argument("--avma-fraction", type=float, default=0.05)
    p.add_argument("--latency", type=float, default=1.0, help="simulated Run Command duration, seconds")
    p.add_argument("--concurrency", type=int, default=32, help="invocations at once on this instance")
    p.add_argument("--subscriptions", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    return p.parse_args(argv)


def vm_check() -> Any:
    [function] = [f for f in function_app.app.get_functions() if f.get_function_name() == "vm_check"]
    return function.get_user_function()


async def host(env: dict[str, str], concurrency: int) -> tuple[int, Counter[str], float]:
    """Receive, invoke, delete, as the Functions host does, until the queue stays empty."""
    from azure.functions.queue import QueueMessage

    handler = vm_check()
    handled, failures = 0, Counter[str]()
    running: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    last_done = started
    async with QueueClient.from_connection_string(
        env["AzureWebJobsStorage"],
        WORK_QUEUE,
        message_encode_policy=TextBase64EncodePolicy(),
        message_decode_policy=TextBase64DecodePolicy(),
    ) as queue:

        async def invoke(message: Any) -> None:
            nonlocal handled, last_done
            trigger = QueueMessage(  # type: ignore[no-untyped-call]
                id=message.id, body=message.content.encode(), dequeue_count=message.dequeue_count
            )
            try:
                await handler(trigger)
            except Exception as error:  # noqa: BLE001 - the host: a failed invocation's message returns
                failures[type(error).__name__] += 1
                return
            await queue.delete_message(message)
            handled += 1
            last_done = time.monotonic()

        idle = 0
        while idle < 20:
            free = concurrency - len(running)
            if free <= 0:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            batch = min(32, free)
            messages = [
                m
                async for m in queue.receive_messages(
                    messages_per_page=batch, max_messages=batch, visibility_timeout=300
                )
            ]
            if not messages:
                if running:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                else:
                    idle += 1
                    await asyncio.sleep(0.05)
                continue
            idle = 0
            for message in messages:
                task = asyncio.create_task(invoke(message))
                running.add(task)
                task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)
    return handled, failures, last_done - started


async def run(args: argparse.Namespace, env: dict[str, str], sim: SimulatorProcess) -> dict[str, Any]:
    os.environ.update(env)
    sweep = await triggers.sweep_scope()  # the timer's code: Resource Graph, then the queue
    before = sim.call("counters")["requests"]
    handled, failures, wall = await host(env, args.concurrency)
    clients = await shared_clients(Settings.from_env(env))
    gateway = clients.compute()
    after = sim.call("counters")["requests"]
    run_commands = gateway.run_commands
    await close_shared_clients()
    vms = max(1, handled)
    lower = run_commands * args.latency / args.concurrency
    return {
        "vms": handled,
        "enqueued": sweep.get("enqueued"),
        "failures": dict(failures),
        "wall_s": round(wall, 2),
        "vms_per_minute": round(handled / wall * 60, 1) if wall else None,
        "run_commands": run_commands,
        "lower_bound_s": round(lower, 2),
        "ratio": round(wall / lower, 3) if lower else None,
        # what the worker sent: every request of the whole run, the sweep's listing left out
        "token_requests_per_vm": round(after.get("token", 0) / vms, 4),
        "token_requests": after.get("token", 0),
        "arm_requests_per_vm": round(gateway.requests / vms, 2),
        "tls_connections": after.get("tls_connection", 0) - before.get("tls_connection", 0),
        "listing_requests": before.get("resource_graph", 0),
        "run_commands_per_fixed_vm": sim.call("run_commands_per_fixed_vm"),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    estate = Estate.generate(
        count=args.vms, seed=args.seed, mix={"avma": args.avma_fraction}, subscriptions=args.subscriptions
    )
    azurite = start_azurite()
    try:
        with SimulatorProcess(estate, latency_s=args.latency) as sim:
            env = {
                **sim.env(),
                "AzureWebJobsStorage": azurite.connection_string,
                "REMEDIATION_MODE": "enforce",
                "LEDGER_TABLE": "bench" + uuid.uuid4().hex[:12],
                "RUN_COMMAND_TIMEOUT_SECONDS": str(max(60.0, 20 * args.latency)),
            }
            figures = asyncio.run(run(args, env, sim))
    finally:
        azurite.close()
    print(
        f"{figures['vms']} VMs in {figures['wall_s']} s ({figures['vms_per_minute']} a minute at "
        f"{args.concurrency} at once); {figures['token_requests']} token requests, "
        f"{figures['tls_connections']} TLS connections",
        file=sys.stderr,
    )
    print(json.dumps({"concurrency": args.concurrency, "latency_s": args.latency, **figures}))


if __name__ == "__main__":
    main()
