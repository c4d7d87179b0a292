"""Azure Functions app (Python v2 programming model): thin adapters around ``shared.triggers``.

Every trigger feeds the ``vm-checks`` queue; one queue-triggered worker runs the per-VM workflow;
the poison queue's handler records what the host gave up on, and a timer records what that handler
could not (the last-resort queue). No decisions are made here.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import azure.functions as func

from shared import triggers
from shared.queueprobe import probe_queues
from shared.recheck import check_vms
from shared.settings import POISON_QUEUE, WORK_QUEUE
from shared.status import status_answer
from shared.telemetry import worker_errors

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
STORAGE = "AzureWebJobsStorage"


@app.function_name("vm_write_event")
@app.event_grid_trigger(arg_name="event")
async def vm_write_event(event: func.EventGridEvent) -> None:
    """Event Grid: ``Microsoft.Resources.ResourceWriteSuccess`` for VM writes → queue.

    The annotation must stay ``EventGridEvent`` (the worker accepts only a class here), but the
    worker's converter hands a ``func.CloudEvent`` whenever the body has ``specversion`` (a
    subscription with the CloudEvents 1.0 delivery schema), whatever the annotation says.
    """
    payload = event_payload(event)
    result = await triggers.on_vm_event(payload)
    logging.info("event %s: %d work items, %d ignored", event.id, len(result.items), len(result.ignored))


def event_payload(event: func.EventGridEvent | func.CloudEvent) -> dict[str, Any]:
    """The runtime object back as the wire JSON of its schema, which ``shared.intake`` parses."""
    if isinstance(event, func.CloudEvent):
        cloud: dict[str, Any] = {
            **event.extension_attrs,
            "specversion": event.specversion,
            "id": event.id,
            "source": event.source,
            "type": event.type,
            "subject": event.subject,
            "time": event.time.isoformat() if event.time else None,
            "data": event.get_json(),
        }
        for key, value in (("datacontenttype", event.datacontenttype), ("dataschema", event.dataschema)):
            if value is not None:
                cloud[key] = value
        return cloud
    return {
        "id": event.id,
        "topic": event.topic,
        "subject": event.subject,
        "eventType": event.event_type,
        "eventTime": event.event_time.isoformat() if event.event_time else None,
        "dataVersion": event.data_version,
        "data": event.get_json(),
    }


@app.function_name("alert_webhook")
@app.route(route="alerts", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def alert_webhook(req: func.HttpRequest) -> func.HttpResponse:
    """Action group (common alert schema) → queue; 202 accepted, 400 malformed, 413 too large,
    503 with ``Retry-After`` within a few seconds when the queue is unreachable."""
    status, body, headers = await triggers.on_alert(req.get_body())
    return func.HttpResponse(
        json.dumps(body), status_code=status, headers=headers, mimetype="application/json"
    )


@app.function_name("log_scan")
@app.timer_trigger(arg_name="timer", schedule="%LOG_SCAN_SCHEDULE%", run_on_startup=False, use_monitor=True)
async def log_scan(timer: func.TimerRequest) -> None:
    """Log Analytics: VMs that logged 0xC004FD02 since the last scan → queue."""
    summary = await triggers.log_scan()
    logging.info("log scan (past due: %s): %s", timer.past_due, summary)


@app.function_name("sweep")
@app.timer_trigger(arg_name="timer", schedule="%SWEEP_SCHEDULE%", run_on_startup=False, use_monitor=True)
async def sweep(timer: func.TimerRequest) -> None:
    """Every Windows VM in scope not verified within RECHECK_AFTER_HOURS → queue."""
    summary = await triggers.sweep_scope()
    logging.info("sweep (past due: %s): %s", timer.past_due, summary)


@app.function_name("vm_check")
@app.queue_trigger(arg_name="msg", queue_name=WORK_QUEUE, connection=STORAGE)
async def vm_check(msg: func.QueueMessage) -> None:
    """The worker: one work item → the per-VM workflow under the VM's lease → ledger. An exception
    (the host retries the message) is logged as one ``avma-worker-error`` record first."""
    async with worker_errors("vm_check"):
        await triggers.work(msg.get_body().decode("utf-8", errors="replace"))


@app.function_name("vm_check_poison")
@app.queue_trigger(arg_name="msg", queue_name=POISON_QUEUE, connection=STORAGE)
async def vm_check_poison(msg: func.QueueMessage) -> None:
    """Messages the host gave up on (``maxDequeueCount``): recorded as ``failed: poison``."""
    async with worker_errors("vm_check_poison"):
        await triggers.poison(msg.get_body().decode("utf-8", errors="replace"))


# A fixed schedule, not an app setting: the last resort must not depend on a setting a deployment
# could leave out (a timer whose schedule setting is missing does not run), and one empty read every ten
# minutes costs nothing.
LAST_RESORT_DRAIN_SCHEDULE = "0 */10 * * * *"


@app.function_name("poison_drain")
@app.timer_trigger(
    arg_name="timer", schedule=LAST_RESORT_DRAIN_SCHEDULE, run_on_startup=False, use_monitor=True
)
async def poison_drain(timer: func.TimerRequest) -> None:
    """First each queue's depth and oldest visible message (``avma-queue`` records, which the
    workbook and the alerts read: shared/queueprobe.py), then ``vm-checks-poison-poison`` (what the
    poison handler could not record) → ledger, then deleted."""
    await probe_queues()
    summary = await triggers.drain_last_resort()
    logging.info("last-resort drain (past due: %s): %s", timer.past_due, summary)


@app.function_name("status")
@app.route(route="status", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
async def status(req: func.HttpRequest) -> func.HttpResponse:
    """Counts by outcome, the most recent actions, and a page of the VMs that match the filters
    (``outcome``, ``reason``, ``vm``, ``since``, ``pageSize``, ``continuation``: shared/status.py);
    400 for a bad query, 503 with ``Retry-After`` within seconds when Table storage is unreachable."""
    code, body, headers = await status_answer(dict(req.params))
    return _json(body, code, headers)


@app.function_name("check")
@app.route(route="check", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def check(req: func.HttpRequest) -> func.HttpResponse:
    """Queue a re-check of one VM or a list (shared/recheck.py): 202 with the correlation id, 400 for
    a malformed id, 403 for a VM out of scope (nothing queued), 503 with ``Retry-After``."""
    code, body, headers = await check_vms(req.get_body())
    return _json(body, code, headers)


def _json(body: object, status_code: int, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, default=str), status_code=status_code, headers=headers, mimetype="application/json"
    )
