"""Long-running operations polled no sooner than the service asks: the first poll after ``Retry-After``.

azure-core's LRO poller (``AsyncLROBasePolling._poll`` in azure-core 1.41) asks for the status once
*right after* the initial answer, and only then starts waiting ``Retry-After`` between polls. For
Run Command that first poll is always wasted: the 202 of ``POST …/runCommand`` says how long to
wait (a ``Retry-After`` in whole seconds: ComputeRP's runCommand.json and the REST reference
"Virtual Machines - Run Command"; ARM's "Track asynchronous Azure operations",
async-operations.md: "the number of seconds to wait before checking the status"), and no script
finishes before it. At estate scale that first poll is one ARM read per Run Command, a fifth of a
healthy VM's requests, spent from the subscription's read budget for nothing.

:class:`RetryAfterFirstPolling` is azure-mgmt-core's ``AsyncARMPolling`` that waits before the
first status request too: the initial answer's ``Retry-After`` when it names a positive wait, else
the client's polling interval (as azure-core does between polls when ``Retry-After`` is absent or
zero). Everything after that is azure-core's own loop: each later wait is the last answer's
``Retry-After``. It uses only the public ``initialize`` and ``run`` of the polling method.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from azure.core.pipeline import PipelineResponse
from azure.mgmt.core.polling.async_arm_polling import AsyncARMPolling

from shared.azure.transient import wait_from_headers


class RetryAfterFirstPolling(AsyncARMPolling):
    """``AsyncARMPolling`` whose first status request waits for the initial ``Retry-After``."""

    def __init__(self, timeout: float = 30, **kwargs: Any) -> None:
        super().__init__(timeout, **kwargs)
        self._interval = timeout
        self._initial_headers: Mapping[str, str] = {}

    def initialize(
        self, client: Any, initial_response: PipelineResponse[Any, Any], deserialization_callback: Any
    ) -> None:
        super().initialize(client, initial_response, deserialization_callback)
        headers = initial_response.http_response.headers
        self._initial_headers = headers if isinstance(headers, Mapping) else {}

    def first_wait_s(self) -> float:
        """The wait before the first status request: ``Retry-After`` if positive, else the interval."""
        wait = wait_from_headers(self._initial_headers)
        return wait if wait else self._interval

    async def run(self) -> None:
        if not self.finished():
            await asyncio.sleep(self.first_wait_s())
        await super().run()
