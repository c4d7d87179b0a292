"""ARM compute through ``azure.mgmt.compute.aio``: read VMs, list them, run a command in them.

ARM failures become typed :class:`ComputeError` subclasses whose ``reason`` is an outcome reason
word, so the workflow never inspects HTTP details itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

from azure.core.async_paging import AsyncItemPaged
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline import PipelineResponse
from azure.core.pipeline.transport import AioHttpTransport
from azure.core.rest import HttpRequest
from azure.mgmt.compute.aio import ComputeManagementClient
from azure.mgmt.compute.operations._operations import build_virtual_machines_get_request
from azure.mgmt.core.exceptions import ARMErrorFormat

from shared.azure.pacing import Pacer
from shared.azure.polling import RetryAfterFirstPolling
from shared.azure.transient import (
    MAX_IN_PROCESS_WAIT_S,
    BoundedRetryPolicy,
    response_headers,
    wait_from_headers,
)
from shared.azure.transport import SubscriptionClients, sdk_json
from shared.model import VmId
from shared.settings import Settings
from shared.vm import VmFacts

log = logging.getLogger(__name__)

SUBSCRIPTIONS_API = "2022-12-01"
STDOUT_CODE = "ComponentStatus/StdOut/succeeded"
STDERR_CODE = "ComponentStatus/StdErr/succeeded"


class ComputeError(Exception):
    """An ARM call failed in a way the workflow turns into an outcome (``reason`` is the word)."""

    reason = "arm-error"

    def __init__(
        self, message: str, *, code: str = "", status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        # The wait ARM named (``Retry-After``, as azure-core reads it), None if it named none: a
        # deferral's retry comes no sooner (request-limits-and-throttling.md: a request sent before
        # it has elapsed is not processed, and gets a new one).
        self.retry_after_s = retry_after_s


class VmNotFound(ComputeError):
    reason = "not-found"


class VmNotRunning(ComputeError):
    reason = "not-running"


class RunCommandBusy(ComputeError):
    reason = "run-command-busy"


class Throttled(ComputeError):
    reason = "throttled"


class ArmUnavailable(ComputeError):
    reason = "arm-unavailable"


class Forbidden(ComputeError):
    reason = "forbidden"


class RunCommandFailed(ComputeError):
    reason = "run-command-failed"


class RunCommandOperationFailed(RunCommandFailed):
    """The Run Command was accepted and its long-running operation ended ``Failed`` (or
    ``Canceled``): azure-core's poller raises ``HttpResponseError`` with the last status answer,
    a 2xx, e.g. ``InternalExecutionError`` "An internal execution error occurred." Nothing about the
    VM was learnt, and a later command usually runs (Azure PowerShell retries a Compute operation
    that ends so): transient, unlike a request ARM refused with a 4xx."""


class AgentNotReady(ComputeError):
    reason = "agent-not-ready"


class RunCommandTimeout(ComputeError):
    reason = "run-command-timeout"


class ArmTimeout(ComputeError):
    """An ARM call (retries included) did not finish within ARM_CALL_TIMEOUT_SECONDS."""

    reason = "arm-timeout"


# No answer: the request never left (ServiceRequestError), or it went out and its answer was lost or
# timed out (ServiceResponseError; azure-core never retries a POST after it: ARM may have acted).
_NO_ANSWER = (ServiceRequestError, ServiceResponseError)

# Error codes ARM and the Run Command extension use when the VM agent cannot take the command.
_AGENT_CODES = {"vmagentstatuscommunicationerror", "vmagentnotready", "vmextensionprovisioningtimeout"}


def translate(error: HttpResponseError) -> ComputeError:
    """Map an SDK error to the typed error the workflow understands."""
    status = error.status_code
    code = ""
    if error.error is not None and error.error.code:
        code = str(error.error.code)
    message = str(error.message or error)[:500]
    wait = retry_after(error)
    if status == 429:
        return Throttled(message, code=code, status=status, retry_after_s=wait)
    if status is not None and status >= 500:
        return ArmUnavailable(message, code=code, status=status, retry_after_s=wait)
    if isinstance(error, ResourceNotFoundError) or status == 404:
        return VmNotFound(message, code=code, status=status)
    if status == 409:
        if code.lower() == "conflict":
            return RunCommandBusy(message, code=code, status=status)
        return VmNotRunning(message, code=code, status=status)
    if status in (401, 403):
        return Forbidden(message, code=code, status=status)
    if code.lower() in _AGENT_CODES:
        return AgentNotReady(message, code=code, status=status)
    if status is not None and 200 <= status < 300:
        # Not a refusal: the operation's status answer (a 2xx) said Failed or Canceled.
        return RunCommandOperationFailed(message, code=code, status=status)
    return RunCommandFailed(message, code=code, status=status)


def retry_after(error: HttpResponseError) -> float | None:
    """The wait an error answer names, in seconds: ``Retry-After`` (seconds or an HTTP-date), else
    ``retry-after-ms`` / ``x-ms-retry-after-ms``, the headers and order of azure-core's own
    ``get_retry_after`` (azure/core/pipeline/policies/_utils.py); None when it names none. Read by
    :func:`~shared.azure.transient.wait_from_headers`, as the pacer, the polls and the retry policy
    read it: it never raises, and a non-finite value names no wait."""
    return wait_from_headers(response_headers(error))


class RunCommandRetryPolicy(BoundedRetryPolicy):
    """azure-core's retries, except for an answer to a POST that ARM may have acted on.

    azure-core retries a POST after a 500, 503 or 504, and after any error that carries a
    ``Retry-After``. For ``runCommand`` a 5xx does not mean the command was refused: ARM may have
    started it and still answered 500 (the simulator's ``serverError`` fault does exactly that). A
    retry that arrives after that command finished runs the script a second time, and for a
    remediation without the detection that must come first. So a POST is retried only after a 429
    (ARM refuses before the resource provider sees the request, and Compute's own throttle rejects
    it unrun: troubleshooting-throttling-errors.md); any other error reaches the
    workflow, which defers, and the next attempt detects the VM's state again before acting.
    Connection errors of a POST are not retried by azure-core either; GETs keep every retry.

    A wait longer than ``max_wait_s`` is not slept in the invocation (azure-core alone sleeps any
    ``Retry-After``, which the call's deadline then cuts short: ``arm-timeout``, the wait forgotten):
    the answer goes back to the workflow as ``throttled`` / ``arm-unavailable`` carrying the wait,
    and the worker's retry comes no sooner. Both, and the reading of the wait (which never raises),
    are :class:`~shared.azure.transient.BoundedRetryPolicy`'s, as for every other client.
    """

    def is_retry(self, settings: dict[str, Any], response: PipelineResponse[Any, Any]) -> bool:
        status = response.http_response.status_code
        if status >= 400 and response.http_request.method.upper() == "POST" and status != 429:
            return False
        return super().is_retry(settings, response)


class ComputeGateway(SubscriptionClients[ComputeManagementClient]):
    """One async compute client per subscription, sharing one credential, one connection pool and
    one :class:`~shared.azure.pacing.Pacer` (ARM's budget per subscription, from its headers)."""

    def __init__(self, credential: AsyncTokenCredential, settings: Settings) -> None:
        super().__init__(settings, session_limit=max(100, 2 * settings.max_concurrency))
        self._credential = credential
        # Waits that fit well within the call's deadline are slept; longer ones become deferrals,
        # in the retry policy (a 429 naming one) and in the pacer (a request held by that 429).
        self._max_wait_s = min(
            MAX_IN_PROCESS_WAIT_S, settings.arm_timeout_s / 2, settings.run_command_timeout_s / 2
        )
        self.pacer = Pacer(
            cloud=settings.cloud.name,
            concurrency=settings.max_concurrency,
            max_wait_s=self._max_wait_s,
            hold_error=_held,
        )
        self.run_commands = 0

    def _make_client(self, subscription_id: str, transport: AioHttpTransport) -> ComputeManagementClient:
        options = self._arm_options(transport)
        options["per_retry_policies"] = [*options["per_retry_policies"], self.pacer.policy()]
        return ComputeManagementClient(
            self._credential,
            subscription_id,
            retry_policy=RunCommandRetryPolicy(max_wait_s=self._max_wait_s),
            **options,
        )

    async def list_subscriptions(self) -> list[str]:
        """Every subscription the credential can see (``GET /subscriptions``), for a sweep with no scope."""
        client = self._client("00000000-0000-0000-0000-000000000000")
        url: str | None = f"{self._settings.arm_endpoint}/subscriptions?api-version={SUBSCRIPTIONS_API}"
        found: list[str] = []
        while url:
            try:
                async with self._deadline("list subscriptions"):
                    response = await client.send_request(HttpRequest("GET", url))
                    response.raise_for_status()
                    await response.read()
                    page = response.json()
            except HttpResponseError as error:
                raise translate(error) from error
            except _NO_ANSWER as error:
                raise ArmUnavailable(str(error)[:300]) from error
            for sub in page.get("value") or []:
                if isinstance(sub, Mapping) and sub.get("state", "Enabled") in (
                    "Enabled",
                    "Warned",
                    "PastDue",
                ):
                    found.append(str(sub.get("subscriptionId")))
            next_link = page.get("nextLink")
            url = str(next_link) if next_link else None
        return found

    async def get_vm(self, vm_id: VmId) -> VmFacts:
        """The VM model with its instance view (power state, agent status) in one call.

        The request is the SDK's own (``virtual_machines.get``'s builder: URL, api-version, Accept),
        sent through the client's pipeline; its JSON goes straight to :class:`VmFacts`. The typed
        model would be built from it and turned back into JSON, most of the engine's CPU per VM.
        """
        client = self._client(vm_id.subscription_id)
        request = build_virtual_machines_get_request(
            vm_id.resource_group, vm_id.name, vm_id.subscription_id, expand="instanceView"
        )
        try:
            async with self._deadline(f"read of {vm_id.name}"):
                response = await client.send_request(request)
                await response.read()
                if response.status_code != 200:
                    raise HttpResponseError(response=response, error_format=ARMErrorFormat)
                body = response.json()
        except HttpResponseError as error:
            raise translate(error) from error
        except _NO_ANSWER as error:
            raise ArmUnavailable(str(error)[:300]) from error
        if not isinstance(body, Mapping):
            raise ArmUnavailable(f"read of {vm_id.name}: the answer is not a VM")
        return VmFacts.from_arm(body)

    async def list_vms(self, subscription_id: str) -> AsyncIterator[VmFacts]:
        """Every VM of a subscription: model (OS type, tags) merged with power state.

        A ``statusOnly=true`` list item carries the instance view but neither tags nor the storage
        profile, so the subscription is listed twice: power states first (a small map), then the
        models, streamed. A VM created between the two listings has no known power state yet; the
        full read before any Run Command settles it.
        """
        client = self._client(subscription_id)
        power: dict[str, str | None] = {}
        async for item in self._pages(client.virtual_machines.list_all(status_only="true")):
            with_status = _listed(item)
            if with_status is not None:
                power[str(with_status.vm_id).lower()] = with_status.power_state
        async for item in self._pages(client.virtual_machines.list_all()):
            facts = _listed(item)
            if facts is not None:
                yield replace(facts, power_state=power.get(str(facts.vm_id).lower()), agent_ready=None)

    @contextlib.asynccontextmanager
    async def _deadline(self, what: str) -> AsyncIterator[None]:
        """Bound one ARM call, azure-core's retries and ``Retry-After`` waits included: a call that
        hangs (a connection that never answers) would otherwise hold the lease and the invocation."""
        limit = self._settings.arm_timeout_s
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError as error:
            raise ArmTimeout(f"{what}: no answer within {limit:g} s (ARM_CALL_TIMEOUT_SECONDS)") from error

    async def _pages(self, pager: AsyncItemPaged[Any]) -> AsyncIterator[Any]:
        """Iterate a pager, turning ARM errors into :class:`ComputeError`; each page has a deadline."""
        pages = pager.by_page()
        while True:
            try:
                async with self._deadline("list page"):
                    page = await pages.__anext__()
                    items = [item async for item in page]
            except StopAsyncIteration:
                return
            except HttpResponseError as error:
                raise translate(error) from error
            except _NO_ANSWER as error:
                raise ArmUnavailable(str(error)[:300]) from error
            for item in items:
                yield item

    async def run_command(self, vm_id: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        """Run a script and wait for it (bounded by RUN_COMMAND_TIMEOUT_SECONDS); give (stdout, stderr)."""
        client = self._client(vm_id.subscription_id)
        self.run_commands += 1
        try:
            async with asyncio.timeout(self._settings.run_command_timeout_s):
                # The body is RunCommandInput's JSON, encoded once (the IO[bytes] form the operation
                # takes; azure-core rewinds it for a retry): the typed model would walk every script
                # line through its serializer, most of a Run Command's CPU. The first status poll
                # waits for the 202's Retry-After (shared/azure/polling.py).
                poller = await client.virtual_machines.begin_run_command(
                    vm_id.resource_group,
                    vm_id.name,
                    io.BytesIO(encoded_body(body)),
                    polling=RetryAfterFirstPolling(self._settings.poll_interval_s),
                )
                result = await poller.result()
        except TimeoutError as error:
            raise RunCommandTimeout(f"no result within {self._settings.run_command_timeout_s:g} s") from error
        except HttpResponseError as error:
            raise translate(error) from error
        except _NO_ANSWER as error:
            raise ArmUnavailable(str(error)[:300]) from error
        stdout, stderr = "", ""
        for status in sdk_json(result).get("value") or []:
            if not isinstance(status, Mapping):
                continue
            if status.get("code") == STDOUT_CODE:
                stdout = str(status.get("message") or "")
            elif status.get("code") == STDERR_CODE:
                stderr = str(status.get("message") or "")
        return stdout, stderr


def _held(subscription: str, kind: str, wait_s: float) -> Throttled:
    """A request the pacer did not send: an earlier 429's Retry-After (or the budget's refill) holds
    its subscription and kind longer than a call sleeps. A deferral, as the 429 that named it."""
    return Throttled(
        f"{kind} of subscription {subscription} held {wait_s:.1f} s by an earlier 429's Retry-After "
        "(request not sent)",
        retry_after_s=wait_s,
    )


def encoded_body(body: Mapping[str, Any]) -> bytes:
    """``json.dumps(dict(body), separators=(",", ":")).encode()``, with the script encoded once.

    Every VM's Run Command carries the same script (the remediation script is about 25 KB of JSON:
    520 lines), and encoding it for each VM was the largest single cost of a Run Command's CPU in
    the engine. The script's lines, as a tuple, key a small cache of their encoding; the rest of the
    body (the command id, each VM's parameters) is encoded as before, in the body's own key order.
    """
    if not all(type(key) is str for key in body):  # json.dumps' own spelling of other keys (true, null)
        return json.dumps(dict(body), separators=(",", ":")).encode()
    parts = []
    for key, value in body.items():
        encoded: bytes | None = None
        # Only lines that are all strings key the cache: 1, 1.0 and True are equal (and hash alike)
        # in a tuple, so a cached ["a", 1] would be sent for ["a", true].
        if key == "script" and isinstance(value, (list, tuple)) and set(map(type, value)) <= {str}:
            encoded = _encoded_lines(tuple(value))
        if encoded is None:
            encoded = json.dumps(value, separators=(",", ":")).encode()
        parts.append(json.dumps(str(key)).encode() + b":" + encoded)
    return b"{" + b",".join(parts) + b"}"


@functools.lru_cache(maxsize=16)
def _encoded_lines(lines: tuple[Any, ...]) -> bytes:
    return json.dumps(list(lines), separators=(",", ":")).encode()


def _listed(item: Any) -> VmFacts | None:
    try:
        return VmFacts.from_arm(sdk_json(item))
    except ValueError as error:  # not an id ARM would give; keep going, say so
        log.warning("skipping a listed VM with an unreadable id: %s", error)
        return None
