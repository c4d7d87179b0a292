"""How many messages each of the app's queues holds, and how long the oldest visible one has waited.

Queue storage's Azure Monitor metrics cannot say this per queue: ``QueueMessageCount`` is one number
for the whole account, at an hourly grain, with no queue dimension (Azure Monitor's supported
metrics for ``Microsoft.Storage/storageAccounts/queueServices``; docs/operations.md). So the
``poison_drain`` timer asks the queues themselves every ten minutes: Get Queue Metadata gives the
approximate message count (``x-ms-approximate-messages-count``, invisible messages included) and
Peek Messages the message at the front with its insertion time. Each queue gives one
``avma-queue`` record (shared/telemetry.py) that the workbook charts and the alerts watch.

What the age means: the oldest *visible* message at the front of the queue, as far as Queue storage
keeps order (it does not promise first-in first-out). A deferred work item is invisible on purpose
until its retry time, so it does not count; a visible message that has waited long means the worker
is not keeping up, or not running. A probe never fails the timer: a queue it cannot read gives a
record with ``error`` set, which the probe-failing alert watches.

Each queue's probe is one try of each read (``retry_total=0``) within :data:`PROBE_DEADLINE_S`:
with the storage SDK's own retries (``ExponentialRetry``, 3 retries after 15 s + 3**n s:
azure-storage-queue ``aio/_queue_client_async.py`` and ``_shared/policies_async.py``) a probe of a
storage account that refuses connections took over four minutes, and one of an account that never
answers far longer. That delayed the last-resort drain that runs after it and spaced the records so
widely that the alert, which wants two failed probes in 30 minutes, could not fire. The next probe
is ten minutes away anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.storage.queue.aio import QueueClient

from shared.lastresort import LAST_RESORT_QUEUE
from shared.settings import POISON_QUEUE, WORK_QUEUE, Settings
from shared.telemetry import log_queue_state, queue_record

PROBED = (WORK_QUEUE, POISON_QUEUE, LAST_RESORT_QUEUE)
PROBE_DEADLINE_S = 10.0
"""How long one queue's two reads (metadata, peek) may take before its record says ``no answer``."""


def queue_client(settings: Settings, credential: AsyncTokenCredential | None, name: str) -> QueueClient:
    """A client that only reads metadata and peeks (no message decoding: bodies are not read), and
    tries each once (``retry_total=0``)."""
    if settings.storage_connection:
        return QueueClient.from_connection_string(settings.storage_connection, name, retry_total=0)
    if settings.queue_service_uri and credential is not None:
        return QueueClient(settings.queue_service_uri, name, credential=credential, retry_total=0)
    raise ValueError("no queue storage configured (AzureWebJobsStorage or its __queueServiceUri)")


async def probe_queue(client: QueueClient, name: str, now: datetime) -> dict[str, Any]:
    try:
        async with asyncio.timeout(PROBE_DEADLINE_S):
            properties = await client.get_queue_properties()
            peeked = await client.peek_messages(max_messages=1)
    except ResourceNotFoundError:
        return queue_record(name, messages=0, oldest_age_s=None, error="")  # never created: empty
    except AzureError as error:
        return queue_record(name, messages=None, oldest_age_s=None, error=_first_line(error))
    except TimeoutError:
        silent = f"no answer within {PROBE_DEADLINE_S:g} s"
        return queue_record(name, messages=None, oldest_age_s=None, error=silent)
    except Exception as error:  # noqa: BLE001 - the SDK failing on an answer is still a failed probe
        # azure-storage-queue's process_storage_error raises TypeError for an error body without a
        # Message (``None += str``): the record says so, and the timer goes on to the drain.
        unread = f"unreadable answer ({type(error).__name__}: {_first_line(error)})"
        return queue_record(name, messages=None, oldest_age_s=None, error=unread)
    count = properties.approximate_message_count
    inserted = peeked[0].inserted_on if peeked else None
    age = max(0.0, (now - inserted).total_seconds()) if isinstance(inserted, datetime) else None
    return queue_record(name, messages=int(count) if count is not None else None, oldest_age_s=age)


async def probe_queues(
    *,
    env: Mapping[str, str] | None = None,
    queues: Sequence[str] = PROBED,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """One ``avma-queue`` record per queue; never raises for a queue it cannot read."""
    from shared.triggers import Runtime  # shared.triggers never imports this module

    now = now or datetime.now(UTC)
    records: list[dict[str, Any]] = []
    try:
        async with Runtime.open(env) as runtime:
            for name in queues:
                client = queue_client(runtime.settings, runtime.credential, name)
                runtime.stack.push_async_callback(client.close)
                records.append(await probe_queue(client, name, now))
    except (AzureError, ValueError) as error:  # the settings or the credential: nothing was probed
        records = [
            queue_record(q, messages=None, oldest_age_s=None, error=_first_line(error)) for q in queues
        ]
    for record in records:
        log_queue_state(record)
    return records


def _first_line(error: BaseException) -> str:
    """The first line that says something, else the error's type: never empty, since an empty
    ``error`` is what a good probe's record has (alert-probe-failing.kql)."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return (text or type(error).__name__)[:300]
