"""``GET /api/status`` and ``POST /api/check`` with storage down: 503 with ``Retry-After`` within
their deadline, never a 500 and never a request held for the storage SDK's own retries.

Through the real function code (function_app.py, as tests/test_status_api.py calls it), with Table
and Queue storage at a port that refuses connections (storage stopped) and at one that accepts them
and never answers (a storage endpoint that hangs).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import azure.functions as func
import pytest

from tests.test_function_app import user, vm_id

ACCOUNT = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=QQ=="


def storage_at(port: int) -> str:
    base = f"http://127.0.0.1:{port}/devstoreaccount1"
    return f"{ACCOUNT};QueueEndpoint={base};TableEndpoint={base}"


@pytest.fixture
def hanging_port() -> Iterator[int]:
    """A port whose connections the kernel accepts (listen backlog) and nothing ever answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield server.getsockname()[1]


@pytest.fixture
def storage_down(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("TARGET_SUBSCRIPTIONS", "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7")
    monkeypatch.setenv("LEDGER_TABLE", "ledgerdown")
    # as after a cold start: this process has not yet made sure the table and the queue exist
    monkeypatch.setattr("shared.triggers._created", set())
    return monkeypatch


async def get_status(**params: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = func.HttpRequest(method="GET", url="/api/status", body=b"", params=params)
    response = await user("status")(request)
    return response.status_code, json.loads(response.get_body()), dict(response.headers)


async def post_check(body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = func.HttpRequest(method="POST", url="/api/check", body=json.dumps(body).encode())
    response = await user("check")(request)
    return response.status_code, json.loads(response.get_body()), dict(response.headers)


@pytest.mark.parametrize("params", [{}, {"vm": vm_id("web-01")}, {"outcome": "failed", "since": "24h"}])
async def test_status_answers_503_with_retry_after_when_table_storage_refuses_connections(
    storage_down: pytest.MonkeyPatch, params: dict[str, str]
) -> None:
    storage_down.setenv("AzureWebJobsStorage", storage_at(9))  # the discard port: nothing listens
    started = time.monotonic()
    code, body, headers = await get_status(**params)
    assert code == 503, body
    assert headers.get("Retry-After") == "30"
    assert "retry later" in body["error"] and "ledger" in body["error"]
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("call", "deadline", "says"),
    [
        (get_status, "shared.status.STATUS_DEADLINE_S", "could not read the ledger"),
        (lambda: post_check({"vmId": vm_id("web-01")}), "shared.recheck.CHECK_DEADLINE_S", "queued twice"),
    ],
    ids=["status", "check"],
)
async def test_each_endpoint_answers_503_within_its_deadline_when_storage_never_answers(
    storage_down: pytest.MonkeyPatch, hanging_port: int, call: Any, deadline: str, says: str
) -> None:
    storage_down.setenv("AzureWebJobsStorage", storage_at(hanging_port))
    storage_down.setattr(deadline, 1.0)
    started = time.monotonic()
    code, body, headers = await call()
    elapsed = time.monotonic() - started
    assert code == 503 and headers.get("Retry-After") == "30"
    assert "timed out" in body["error"] and "retry later" in body["error"] and says in body["error"]
    assert elapsed < 3


def test_the_deadlines_leave_the_caller_waiting_seconds_not_minutes() -> None:
    from shared import recheck, status

    assert 0 < status.STATUS_DEADLINE_S <= 10 and 0 < recheck.CHECK_DEADLINE_S <= 10
