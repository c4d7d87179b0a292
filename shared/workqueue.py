"""The ``vm-checks`` queue: every trigger sends work items here; one worker drains it.

Messages are base64-encoded JSON, the Functions queue trigger's default encoding. A deferral is
sent back with a visibility delay, which is how the worker retries without a timer of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Iterable

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.storage.queue import TextBase64DecodePolicy, TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient

from shared.model import WorkItem
from shared.settings import WORK_QUEUE, Settings

log = logging.getLogger(__name__)

MAX_VISIBILITY_DELAY_S = 7 * 24 * 3600  # Azure Queue storage's limit


class QueueError(Exception):
    """A queue operation failed; the caller lets the Functions host retry the invocation."""


class QueueMissing(QueueError):
    """The queue does not exist (deleted, or lost with an emulator restarted in memory)."""


class WorkQueue:
    """Send work items (one, or many with bounded parallelism) to a storage queue."""

    def __init__(self, client: QueueClient) -> None:
        self._client = client

    @classmethod
    def from_settings(
        cls, settings: Settings, credential: AsyncTokenCredential | None, *, name: str = WORK_QUEUE
    ) -> WorkQueue:
        """Azurite/local: the connection string; Azure: the queue endpoint with the managed identity."""
        encode, decode = TextBase64EncodePolicy(), TextBase64DecodePolicy()
        if settings.storage_connection:
            client = QueueClient.from_connection_string(
                settings.storage_connection, name, message_encode_policy=encode, message_decode_policy=decode
            )
        elif settings.queue_service_uri and credential is not None:
            client = QueueClient(
                settings.queue_service_uri,
                name,
                credential=credential,
                message_encode_policy=encode,
                message_decode_policy=decode,
            )
        else:
            raise QueueError("no queue storage configured (AzureWebJobsStorage or its __queueServiceUri)")
        return cls(client)

    async def create_if_needed(self) -> None:
        try:
            await self._client.create_queue()
        except ResourceExistsError:
            pass
        except AzureError as error:
            raise QueueError(f"cannot create queue: {error}") from error

    async def send(self, item: WorkItem, *, delay_s: float = 0.0) -> None:
        # Whole seconds, rounded up: the worker counts each retry's delay against the deadline
        # (``deferredS``) and honours ARM's Retry-After, so the message must stay invisible at
        # least that long (truncated, a 4.5 s retry came back after 4 s, a 0.5 s one at once).
        delay = math.ceil(min(max(delay_s, 0.0), MAX_VISIBILITY_DELAY_S))
        try:
            await self._client.send_message(json.dumps(item.to_dict()), visibility_timeout=delay or None)
        except ResourceNotFoundError as error:  # QueueNotFound
            raise QueueMissing(f"cannot enqueue {item.target}: the queue does not exist: {error}") from error
        except AzureError as error:
            raise QueueError(f"cannot enqueue {item.target}: {error}") from error

    async def send_many(self, items: Iterable[WorkItem], *, parallel: int = 16) -> int:
        """Send in bounded parallel batches; return how many were sent (all, or it raises)."""
        sent = 0
        batch: list[WorkItem] = []
        for item in items:
            batch.append(item)
            if len(batch) >= parallel:
                await asyncio.gather(*(self.send(i) for i in batch))
                sent += len(batch)
                batch = []
        if batch:
            await asyncio.gather(*(self.send(i) for i in batch))
            sent += len(batch)
        return sent

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> WorkQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
