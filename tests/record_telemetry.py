"""Record what the app logs, as Application Insights rows, for tests/test_workbook.py.

Run by hand when shared/telemetry.py changes (``.venv/bin/python -m tests.record_telemetry``); it
writes tests/data/telemetry/sample-traces.json. It drives the real trigger code against the
simulator and Azurite (enforce and audit mode, a VM out of scope, a poison and a malformed message,
a worker exception with storage down, a queue probe), captures every ``avma_remediator`` log record
with OpenTelemetry's ``LoggingHandler`` (what the Functions Python worker installs when
``PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true``) and turns each into the envelope the Azure
Monitor exporter sends (``_convert_log_to_envelope``, azure-monitor-opentelemetry-exporter): its
message and its properties, which Application Insights shows as ``message`` and
``customDimensions``. tests/test_workbook.py checks that the recording still has the fields the
code emits today.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from azure.monitor.opentelemetry.exporter.export.logs._exporter import _convert_log_to_envelope
from azure.storage.queue.aio import QueueClient
from opentelemetry.instrumentation.logging.handler import LoggingHandler
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

from shared import triggers
from shared.queueprobe import probe_queues
from shared.settings import POISON_QUEUE, WORK_QUEUE
from shared.telemetry import worker_errors
from simulator import Estate, Simulator
from tests.azurite import start_azurite
from tests.estates import windows_vm

OUT = Path(__file__).resolve().parent / "data" / "telemetry" / "sample-traces.json"
SUB = "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7"
OTHER_SUB = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def vm(name: str, sub: str = SUB) -> str:
    return f"/subscriptions/{sub}/resourceGroups/rg-apps/providers/Microsoft.Compute/virtualMachines/{name}"


ESTATE = {
    "subscriptions": [SUB, OTHER_SUB],
    "vms": [
        windows_vm(vm("web-01")),
        windows_vm(vm("app-02")),
        windows_vm(vm("kms-down-03"), reachable=False),
        windows_vm(vm("noagent-04"), agentReady=False),
        windows_vm(vm("licensed-05"), channel="KMS_CLIENT"),
        windows_vm(vm("audit-06")),
        windows_vm(vm("foreign-07", OTHER_SUB)),
    ],
}


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def item(reason: str, target: str, minutes_ago: float) -> str:
    first = (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat()
    return json.dumps(
        {"reason": reason, "vmId": target, "correlationId": f"rec-{uuid.uuid4().hex[:8]}", "firstSeen": first}
    )


async def scenario(env: dict[str, str]) -> None:
    with environ(env):
        for queue in (WORK_QUEUE, POISON_QUEUE):
            async with QueueClient.from_connection_string(env["AzureWebJobsStorage"], queue) as client:
                with contextlib.suppress(Exception):
                    await client.create_queue()
        await triggers.work(item("vm-created", vm("web-01"), 7))
        await triggers.work(item("alert", vm("app-02"), 3))
        await triggers.work(item("log-scan", vm("kms-down-03"), 30))
        await triggers.work(item("vm-created", vm("noagent-04"), 45))
        await triggers.work(item("sweep", vm("licensed-05"), 1))
        await triggers.work(item("vm-created", vm("foreign-07", OTHER_SUB), 2))
        await triggers.work("definitely not a work item")
        await triggers.poison(item("vm-created", vm("web-01"), 90))
        with environ({"REMEDIATION_MODE": "audit"}):
            await triggers.work(item("sweep", vm("audit-06"), 5))
        async with QueueClient.from_connection_string(env["AzureWebJobsStorage"], WORK_QUEUE) as client:
            await client.send_message("cGVuZGluZw==")
        await probe_queues()
        dead = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=QQ==;"
        dead += "QueueEndpoint=http://127.0.0.1:9/devstoreaccount1;TableEndpoint=http://127.0.0.1:9/devstoreaccount1"
        triggers._created.clear()
        with environ({"AzureWebJobsStorage": dead}), contextlib.suppress(Exception):
            async with worker_errors("vm_check"):
                await asyncio.wait_for(triggers.work(item("alert", vm("web-01"), 1)), 20)


def row(envelope: Any) -> dict[str, Any]:
    data = envelope.data.base_data
    return {
        "timestamp": envelope.time.isoformat() if isinstance(envelope.time, datetime) else str(envelope.time),
        "message": data.message,
        "severityLevel": {"Verbose": 0, "Information": 1, "Warning": 2, "Error": 3, "Critical": 4}.get(
            str(data.severity_level), data.severity_level
        ),
        "customDimensions": dict(data.properties or {}),
    }


def main() -> None:
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    logger = logging.getLogger("avma_remediator")
    logger.setLevel(logging.INFO)
    logger.addHandler(LoggingHandler(logger_provider=provider))
    server = start_azurite()
    try:
        with Simulator(Estate.from_dict(ESTATE), latency_s=0.01) as sim:
            env = {
                **sim.env(),
                "TARGET_SUBSCRIPTIONS": SUB,
                "AzureWebJobsStorage": server.connection_string,
                "REMEDIATION_MODE": "enforce",
                "LEDGER_TABLE": "rec" + uuid.uuid4().hex[:12],
                "DEFER_DELAY_SECONDS": "1",
            }
            asyncio.run(scenario(env))
    finally:
        server.close()
    rows = [row(_convert_log_to_envelope(record)) for record in exporter.get_finished_logs()]
    for r in rows:  # machine paths do not belong in a recording
        r["customDimensions"].pop("code.file.path", None)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{len(rows)} rows written to {OUT}")


if __name__ == "__main__":
    main()
