"""Storage that refuses the app's identity (403) is configuration to fix, not an outage to wait out.

``GET /api/status``, ``POST /api/check`` and the alert webhook answer a 500 that says so, without
``Retry-After``, and log it at error level (the alert's targets with it); a storage that is busy
(503 ``ServerBusy``) or down stays a 503 with ``Retry-After`` (tests/test_ops_unavailable.py).
Through the real function code, against a loopback server that answers every Table and Queue
request the way Storage does for an identity without the data role (``AuthorizationPermissionMismatch``,
learn.microsoft.com/rest/api/storageservices/common-rest-api-error-codes) or with its network
rules closed (``AuthorizationFailure``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import azure.functions as func
import pytest
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
)

from shared.azure.inventory import InventoryUnavailable
from shared.ledger import LedgerError
from shared.queueprobe import PROBED, probe_queue, probe_queues
from shared.retry_later import answer_or_retry_later, refusal
from shared.workqueue import QueueError
from tests.payloads import dim, v2_alert
from tests.test_function_app import user, vm_id
from tests.test_ops_unavailable import get_status, post_check, storage_at, storage_down

__all__ = ["storage_down"]  # a fixture defined where it comes from

MESSAGES = {
    "AuthorizationPermissionMismatch": "This request is not authorized to perform this operation using this permission.",
    "AuthorizationFailure": "This request is not authorized to perform this operation.",
    "ServerBusy": "The server is busy.",
}


def storage_answering(status: int, code: str, *, message: bool = True) -> Callable[[], Iterator[int]]:
    """A fixture: the port of a server that answers every request ``status`` with Storage's ``code``
    (JSON for Table storage, which asks for it, XML for Queue storage), and its message unless not
    ``message`` (an error body that names only the code, as a proxy in front of storage may send)."""

    def serve() -> Iterator[int]:
        class Refuse(BaseHTTPRequestHandler):
            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                text = f"{MESSAGES[code]}\nRequestId:00000000-0000-0000-0000-000000000000\nTime:2026-12-01T12:00:00.0000000Z"
                if "json" in (self.headers.get("Accept") or ""):
                    body = json.dumps(
                        {"odata.error": {"code": code, "message": {"lang": "en-US", "value": text}}}
                    )
                    kind = "application/json;odata=minimalmetadata;streaming=true;charset=utf-8"
                else:
                    said = f"<Message>{text}</Message>" if message else ""
                    body = f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>{said}</Error>'
                    kind = "application/xml"
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("x-ms-error-code", code)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_MERGE = answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            server.server_close()

    return serve


no_role = pytest.fixture(storage_answering(403, "AuthorizationPermissionMismatch"))
network_closed = pytest.fixture(storage_answering(403, "AuthorizationFailure"))
busy = pytest.fixture(storage_answering(503, "ServerBusy"))
code_only = pytest.fixture(storage_answering(403, "AuthorizationFailure", message=False))


async def post_alert() -> tuple[int, dict[str, Any], dict[str, str]]:
    alert = v2_alert(dimensions=[dim("_ResourceId", vm_id("app-02").lower())], targets=[vm_id("app-02")])
    request = func.HttpRequest(method="POST", url="/api/alerts", body=json.dumps(alert).encode())
    response = await user("alert_webhook")(request)
    return response.status_code, json.loads(response.get_body()), dict(response.headers)


CALLS = {
    "status": (lambda: get_status(outcome="failed"), "ledger"),
    "check": (lambda: post_check({"vmId": vm_id("web-01")}), "enqueue"),
    "alert": (post_alert, "queue"),
}


@pytest.mark.parametrize("endpoint", list(CALLS))
async def test_storage_refusing_the_identity_is_a_500_saying_what_to_fix_not_a_503(
    storage_down: pytest.MonkeyPatch, no_role: int, endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    storage_down.setenv("AzureWebJobsStorage", storage_at(no_role))
    call, _ = CALLS[endpoint]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="shared"):
        code, body, headers = await call()
    assert time.monotonic() - started < 5  # a 403 is not retried by the storage SDK
    assert code == 500, body
    assert "Retry-After" not in headers
    error = body["error"]
    assert "AuthorizationPermissionMismatch" in error and "HTTP 403" in error
    assert "not authorized" in error  # Storage's own words, first line
    assert "role" in error and "retrying will not help" in error and "retry later" not in error
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "refused" in r.getMessage()]
    assert logged, caplog.text
    if endpoint == "alert":  # the targets the action group will not resend are on record
        assert vm_id("app-02").lower() in logged[0].getMessage().lower()


async def test_storage_behind_closed_network_rules_is_a_500_too(
    storage_down: pytest.MonkeyPatch, network_closed: int
) -> None:
    storage_down.setenv("AzureWebJobsStorage", storage_at(network_closed))
    code, body, headers = await get_status()
    assert code == 500 and "Retry-After" not in headers
    assert "AuthorizationFailure" in body["error"] and "network rules" in body["error"]


@pytest.mark.parametrize("endpoint", list(CALLS))
async def test_busy_storage_stays_a_503_with_retry_after(
    storage_down: pytest.MonkeyPatch, busy: int, endpoint: str
) -> None:
    storage_down.setenv("AzureWebJobsStorage", storage_at(busy))
    for deadline in ("shared.status.STATUS_DEADLINE_S", "shared.recheck.CHECK_DEADLINE_S"):
        storage_down.setattr(deadline, 1.0)
    storage_down.setattr("shared.triggers.ALERT_QUEUE_DEADLINE_S", 1.0)
    call, _ = CALLS[endpoint]
    code, body, headers = await call()
    assert code == 503, body
    assert headers.get("Retry-After") in {"20", "30"}
    assert "retry later" in body["error"]


# ----------------------------------------------------------------- answer_or_retry_later itself


def http_error(
    status: int, code: str = "", cls: type[HttpResponseError] = HttpResponseError
) -> HttpResponseError:
    error = cls(message=f"{MESSAGES.get(code, 'refused')}\nRequestId:x")
    error.status_code = status
    error.error_code = code or None
    return error


def wrapped(inner: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as error:
            raise outer from error
    except BaseException as raised:
        return raised


@pytest.mark.parametrize(
    ("failure", "refused"),
    [
        (http_error(403, "AuthorizationPermissionMismatch"), True),
        (http_error(401, "InvalidAuthenticationInfo", ClientAuthenticationError), True),
        (wrapped(http_error(403, "AuthorizationFailure"), LedgerError("ledger status failed")), True),
        (wrapped(http_error(403), QueueError("cannot enqueue")), True),
        (http_error(503, "ServerBusy"), False),
        (http_error(429), False),
        (http_error(500), False),
        (http_error(404, "QueueNotFound", ResourceNotFoundError), False),
        (wrapped(http_error(503), LedgerError("ledger status failed")), False),
        (LedgerError("no table storage configured"), False),
    ],
)
def test_a_refusal_is_a_401_or_403_itself_or_raised_from(failure: BaseException, refused: bool) -> None:
    assert (refusal(failure) is not None) is refused


async def answer(failure: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    async def work() -> tuple[int, dict[str, Any], dict[str, str]]:
        raise failure

    return await answer_or_retry_later(
        work(), deadline_s=1, retry_after_s=7, error="not done ({why}); retry later", detail="vm-1"
    )


async def test_a_wrapped_refusal_answers_500_with_the_wrapper_s_first_line_and_the_code() -> None:
    failure = wrapped(
        http_error(403, "AuthorizationPermissionMismatch"), LedgerError("ledger status page failed")
    )
    code, body, headers = await answer(failure)
    assert (code, headers) == (500, {})
    assert body["error"].startswith(
        "refused (HTTP 403 AuthorizationPermissionMismatch: ledger status page failed)"
    )


async def test_an_unavailable_storage_still_answers_503_and_anything_else_still_raises() -> None:
    code, body, headers = await answer(
        wrapped(http_error(503, "ServerBusy"), LedgerError("ledger read failed"))
    )
    assert (code, headers) == (503, {"Retry-After": "7"}) and body == {
        "error": "not done (ledger read failed); retry later"
    }
    with pytest.raises(KeyError):
        await answer(KeyError("a bug"))
    with pytest.raises(KeyError):  # a bug raised from a 5xx is still a bug
        await answer(wrapped(http_error(503), KeyError("a bug")))


async def test_a_cancelled_request_is_cancelled_not_answered() -> None:
    """The client gone (the host cancels the invocation): no 503, no log of an outage."""
    started = asyncio.Event()

    async def work() -> tuple[int, dict[str, Any], dict[str, str]]:
        started.set()
        await asyncio.sleep(60)
        return 200, {}, {}

    task = asyncio.create_task(
        answer_or_retry_later(work(), deadline_s=30, retry_after_s=7, error="not done ({why})")
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ----------------------------------------------------------------------------- the queue probe


async def test_the_probe_of_a_queue_storage_refusing_the_identity_records_storage_s_words(
    storage_down: pytest.MonkeyPatch, no_role: int
) -> None:
    """What docs/operations.md tells the operator to look for in the probe-failing alert's records."""
    storage_down.setenv("AzureWebJobsStorage", storage_at(no_role))
    records = await asyncio.wait_for(probe_queues(), 10)
    assert [r["queue"] for r in records] == list(PROBED)
    for record in records:
        assert record["approximateMessages"] is None
        assert record["error"] == MESSAGES["AuthorizationPermissionMismatch"]


async def test_a_probe_the_storage_sdk_itself_fails_on_still_records_each_queue_and_does_not_raise(
    storage_down: pytest.MonkeyPatch, code_only: int
) -> None:
    """An error body without a ``Message`` makes azure-storage-queue's ``process_storage_error``
    raise ``TypeError`` (``None += str``): the probe must still give each queue a failed record, so
    that the probe-failing alert can fire and ``poison_drain`` goes on to drain the last resort."""
    storage_down.setenv("AzureWebJobsStorage", storage_at(code_only))
    records = await asyncio.wait_for(probe_queues(), 10)
    assert [r["queue"] for r in records] == list(PROBED)
    for record in records:
        assert record["approximateMessages"] is None
        assert record["error"].startswith("unreadable answer (TypeError")


class Failing:
    """A queue client whose first read raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def get_queue_properties(self) -> Any:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [AzureError("\nRequestId:x"), AzureError(""), HttpResponseError(message="\n"), RuntimeError("\n")],
    ids=["blank-first-line", "empty", "http-blank", "sdk-bug-blank"],
)
async def test_a_failed_probe_never_has_an_empty_error(error: BaseException) -> None:
    """The probe-failing alert counts a record as failed by its non-empty ``error``: a failure whose
    text starts with a line break must not look like a good probe."""
    record = await probe_queue(Failing(error), "vm-checks", datetime.now(UTC))  # type: ignore[arg-type]
    assert record["approximateMessages"] is None
    assert record["error"].strip(), record


async def test_the_503_names_its_cause_even_when_the_error_text_starts_with_a_line_break() -> None:
    code, body, _ = await answer(LedgerError("\nledger read failed: no answer"))
    assert code == 503 and body["error"] == "not done (ledger read failed: no answer); retry later"


# ------------------------------------------------------------- what the alert webhook keeps on record


@pytest.mark.parametrize("answering", ["refused-connection", "no-role"])
async def test_an_alert_not_queued_has_every_target_on_record(
    storage_down: pytest.MonkeyPatch, no_role: int, answering: str, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/operations.md: the webhook logs the alert's targets at error level, so an alert the action
    group gives up on is still on record. All of them, not the first few thousand characters."""
    port = 9 if answering == "refused-connection" else no_role
    storage_down.setenv("AzureWebJobsStorage", storage_at(port))
    storage_down.setenv("MAX_TARGETS_PER_ALERT", "300")  # 40,000 characters of VM ids
    names = [f"web-{n:03d}" for n in range(300)]
    alert = v2_alert(dimensions=[], targets=[vm_id(name) for name in names])
    request = func.HttpRequest(method="POST", url="/api/alerts", body=json.dumps(alert).encode())
    with caplog.at_level(logging.ERROR, logger="shared"):
        response = await user("alert_webhook")(request)
    assert response.status_code == (503 if answering == "refused-connection" else 500)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR).lower()
    missing = [name for name in names if vm_id(name).lower() not in logged]  # whole, never cut
    assert not missing, f"{len(missing)} of {len(names)} targets not on record, e.g. {missing[:3]}"
    assert all(len(r.getMessage()) <= 32768 for r in caplog.records)  # Application Insights' message limit


@pytest.mark.parametrize(
    "failure",
    [
        InventoryUnavailable("Resource Graph: no connection", reason="arm-unavailable"),
        QueueError("cannot enqueue: Connection refused"),
        LedgerError("ledger status page failed: Connection refused"),
        ServiceRequestError("Cannot connect to host"),
        TimeoutError(),
    ],
    ids=["resource-graph", "queue", "ledger", "raw-sdk", "deadline"],
)
async def test_each_kind_of_unavailable_dependency_is_a_503_with_retry_after(failure: BaseException) -> None:
    """docs/operations.md: storage down, or Resource Graph for a management-group scope, is a 503
    with Retry-After for /api/status, /api/check and the alert webhook, never a 500."""
    code, body, headers = await answer(failure)
    assert (code, headers) == (503, {"Retry-After": "7"}), body
    assert body["error"].endswith("; retry later")
