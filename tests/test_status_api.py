"""``GET /api/status`` filters and pages, and ``POST /api/check``, through the real function code.

The ledger is Azurite (tests/azurite.py); verdicts are stored with the ledger's own lease and release,
so the state rows are the ones the worker writes. ``POST /api/check`` runs against the simulator and
its queued item through the real worker (tests/test_function_app.py's host stand-in).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import azure.functions as func
import pytest
from azure.storage.queue.aio import QueueClient

import shared.status
from shared.ledger import Ledger
from shared.model import Outcome, OutcomeKind, VmId
from shared.recheck import MAX_CHECK_VMS, parse_check_request
from shared.settings import WORK_QUEUE, Settings
from shared.status import MAX_PAGE_SIZE, StatusQuery, StatusQueryError
from tests.test_function_app import (
    FOREIGN,
    OTHER_SUB,
    SUB,
    app_env,
    bindings,
    drain,
    history,
    queue_client,
    scoped,
    sim,
    user,
    vm_id,
)

__all__ = ["app_env", "scoped", "sim"]  # fixtures used here, defined in tests/test_function_app.py

NOW = datetime.now(UTC).replace(microsecond=0)
# (name, outcome, reason, hours before NOW)
VERDICTS = [
    ("a-01", "failed", "activation-error:0xC004F074", 1),
    ("a-02", "failed", "kms-unreachable", 30),
    ("a-03", "healthy", "kms-licensed", 2),
    ("a-04", "failed", "activation-error:0xC004F06C", 50),
    ("a-05", "deferred", "agent-not-ready", 3),
    ("a-06", "remediated", "avma-channel", 4),
    ("a-07", "would-remediate", "avma-channel", 5),
]


@pytest.fixture
async def ledger_env(azurite: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh ledger table with the verdicts above (hours before NOW), stored by lease and release."""
    env = {"AzureWebJobsStorage": azurite.connection_string, "LEDGER_TABLE": "st" + uuid.uuid4().hex[:12]}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    async with Ledger.from_settings(Settings.from_env(env)) as ledger:
        await ledger.create_table_if_needed()
        for name, kind, reason, hours in VERDICTS:
            vm = VmId.parse(vm_id(name))
            at = NOW - timedelta(hours=hours)
            lease = await ledger.acquire(vm, owner="test", now=at)
            assert lease is not None
            await ledger.release(lease, Outcome(str(vm), OutcomeKind(kind), reason), now=at)
    return env


async def get_status(**params: str) -> tuple[int, dict[str, Any]]:
    response = await user("status")(
        func.HttpRequest(method="GET", url="/api/status", body=b"", params=params)
    )
    return response.status_code, json.loads(response.get_body())


def names(body: dict[str, Any]) -> list[str]:
    return [item["vmId"].rsplit("/", 1)[-1] for item in body["items"]]


# --- filters --------------------------------------------------------------------------------------


async def test_without_filters_the_summary_stays_and_every_vm_is_listed(ledger_env: dict[str, str]) -> None:
    code, body = await get_status()
    assert code == 200
    assert body["vms"] == len(VERDICTS) and body["counts"]["failed"] == 3  # the summary as before
    assert names(body) == [v[0] for v in VERDICTS]  # VM-key order
    assert body["continuation"] is None and body["pageSize"] == shared.status.DEFAULT_PAGE_SIZE
    first = body["items"][0]
    assert (first["outcome"], first["reason"], first["inProgress"]) == (
        "failed",
        "activation-error:0xC004F074",
        False,
    )
    assert first["decidedAt"] == (NOW - timedelta(hours=1)).isoformat()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"outcome": "failed"}, ["a-01", "a-02", "a-04"]),
        ({"outcome": "failed,deferred"}, ["a-01", "a-02", "a-04", "a-05"]),
        ({"reason": "kms-unreachable"}, ["a-02"]),
        ({"reason": "activation-error:*"}, ["a-01", "a-04"]),
        ({"outcome": "failed", "reason": "activation-error:*", "since": "24h"}, ["a-01"]),
        ({"reason": "avma-channel", "outcome": "would-remediate"}, ["a-07"]),
        ({"vm": "A-03"}, ["a-03"]),
        ({"since": (NOW - timedelta(hours=4.5)).isoformat()}, ["a-01", "a-03", "a-05", "a-06"]),
        ({"outcome": "skipped"}, []),
    ],
)
async def test_each_filter_selects_the_vms_whose_latest_verdict_matches(
    ledger_env: dict[str, str], params: dict[str, str], expected: list[str]
) -> None:
    code, body = await get_status(**params)
    assert code == 200, body
    assert names(body) == expected
    assert body["counts"]["failed"] == 3  # the summary is never filtered


async def test_a_full_vm_id_gives_that_vm_and_its_history(ledger_env: dict[str, str]) -> None:
    async with Ledger.from_settings(Settings.from_env(ledger_env)) as ledger:
        await ledger.record(
            VmId.parse(vm_id("a-02")),
            outcome=Outcome(vm_id("a-02"), OutcomeKind.FAILED, "kms-unreachable"),
            trigger="manual",
            correlation_id="check:1",
            attempt=0,
        )
    code, body = await get_status(vm=vm_id("A-02"))  # ARM ids ignore case
    assert code == 200, body
    assert names(body) == ["a-02"]
    assert [(h["reason"], h["correlationId"]) for h in body["history"]] == [("kms-unreachable", "check:1")]


# --- pages ----------------------------------------------------------------------------------------


async def test_pages_cover_every_vm_once_in_order_and_the_last_has_no_token(
    ledger_env: dict[str, str],
) -> None:
    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        params = {"pageSize": "3", **({"continuation": token} if token else {})}
        code, body = await get_status(**params)
        assert code == 200, body
        assert len(body["items"]) <= 3
        seen += names(body)
        pages += 1
        token = body["continuation"]
        if token is None:
            break
    assert seen == [v[0] for v in VERDICTS] and pages == 3


async def test_a_filtered_page_stops_reading_at_the_scan_bound_and_the_next_page_goes_on(
    ledger_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared.status, "MAX_SCANNED_PER_PAGE", 2)
    seen: list[str] = []
    token: str | None = None
    for _ in range(10):
        params = {"vm": "a-06", **({"continuation": token} if token else {})}
        code, body = await get_status(**params)
        assert code == 200, body
        seen += names(body)
        token = body["continuation"]
        if token is None:
            break
    assert seen == ["a-06"] and token is None


async def test_a_token_only_works_with_the_filters_it_was_issued_for(ledger_env: dict[str, str]) -> None:
    _, first = await get_status(outcome="failed", pageSize="1")
    token = first["continuation"]
    assert token
    code, body = await get_status(outcome="failed", pageSize="1", continuation=token)
    assert (code, names(body)) == (200, ["a-02"])
    code, body = await get_status(outcome="healthy", continuation=token)
    assert code == 400 and "continuation" in body["error"]
    code, body = await get_status(continuation="bm90LWEtdG9rZW4")
    assert code == 400 and "continuation" in body["error"]


@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"outcome": "broken"}, "outcome='broken'"),
        ({"pageSize": "0"}, "pageSize=0"),
        ({"pageSize": str(MAX_PAGE_SIZE + 1)}, f"pageSize={MAX_PAGE_SIZE + 1}"),
        ({"since": "yesterday"}, "since='yesterday'"),
        ({"since": "999999d"}, "too far back"),
        ({"vm": "/subscriptions/x/resourceGroups/r/providers/Microsoft.Compute/virtualMachines/v"}, "vm:"),
        ({"vm": "a b"}, "vm='a b'"),
        ({"reason": "*"}, "reason=*"),
        ({"colour": "blue"}, "colour"),
        ({"recent": "x"}, "recent='x'"),
    ],
)
async def test_a_bad_query_is_refused_naming_the_parameter(
    ledger_env: dict[str, str], params: dict[str, str], word: str
) -> None:
    code, body = await get_status(**params)
    assert code == 400
    assert word in body["error"]


def test_every_problem_is_named_at_once_and_the_function_key_parameter_is_ignored() -> None:
    with pytest.raises(StatusQueryError) as raised:
        StatusQuery.from_params({"outcome": "nope", "pageSize": "x", "since": "later"})
    assert len(raised.value.problems) == 3
    assert StatusQuery.from_params({"code": "the-function-key", "recent": "5000"}).recent == 200


# --- POST /api/check -------------------------------------------------------------------------------


async def post_check(body: object) -> tuple[int, dict[str, Any], dict[str, str]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await user("check")(func.HttpRequest(method="POST", url="/api/check", body=raw))
    return response.status_code, json.loads(response.get_body()), dict(response.headers)


async def queued(env: dict[str, str]) -> list[dict[str, Any]]:
    async with queue_client(env) as queue:
        return [json.loads(m.content) for m in await queue.peek_messages(max_messages=32)]


def test_the_check_route_takes_a_post_with_the_function_key() -> None:
    route = bindings("check")["req"]
    assert (route["type"], route["route"], route["methods"], route["authLevel"]) == (
        "httpTrigger",
        "check",
        ["POST"],
        "FUNCTION",
    )


async def test_a_check_queues_one_vm_in_scope_with_a_correlation_id_the_worker_records(
    app_env: dict[str, str],
) -> None:
    code, body, _ = await post_check({"vmId": vm_id("web-01")})
    assert code == 202, body
    correlation = body["correlationId"]
    assert correlation.startswith("check:") and body["queued"] == [vm_id("web-01")]
    (item,) = await queued(app_env)
    assert (item["vmId"], item["reason"], item["correlationId"]) == (vm_id("web-01"), "manual", correlation)
    await drain(app_env)
    rows = await history(app_env, vm_id("web-01"))
    assert rows[0]["outcome"] == "remediated" and rows[0]["trigger"] == "manual"
    assert {r["correlationId"] for r in rows} == {correlation}


async def test_a_check_of_a_list_queues_each_vm_once_under_one_correlation_id(
    app_env: dict[str, str],
) -> None:
    code, body, _ = await post_check({"vmIds": [vm_id("web-01"), vm_id("app-02"), vm_id("WEB-01")]})
    assert code == 202, body
    assert body["queued"] == [vm_id("web-01"), vm_id("app-02")]
    items = await queued(app_env)
    assert sorted(i["vmId"] for i in items) == sorted([vm_id("web-01"), vm_id("app-02")])
    assert {i["correlationId"] for i in items} == {body["correlationId"]}


@pytest.mark.parametrize(
    ("body", "word"),
    [
        ({"vmId": "web-01"}, "not a virtual machine resource id"),
        ({"vmIds": [vm_id("web-01"), "/subscriptions/nope/resourceGroups/r/providers/x"]}, "[1]"),
        ({"vmIds": []}, "non-empty"),
        ({"vmIds": [vm_id(f"v-{i}") for i in range(MAX_CHECK_VMS + 1)]}, f"at most {MAX_CHECK_VMS}"),
        ({"vm": vm_id("web-01")}, "expected"),
        (b"{not json", "not JSON"),
    ],
)
async def test_a_malformed_check_is_refused_and_queues_nothing(
    app_env: dict[str, str], body: object, word: str
) -> None:
    code, answer, _ = await post_check(body)
    assert code == 400
    assert word in answer["error"]
    assert await queued(app_env) == []


async def test_a_check_naming_a_vm_out_of_scope_is_refused_and_queues_nothing(scoped: Any) -> None:
    env, _sim = scoped
    code, body, _ = await post_check({"vmIds": [vm_id("web-01"), FOREIGN]})
    assert code == 403
    assert "nothing queued" in body["error"]
    assert [o["vmId"] for o in body["outOfScope"]] == [FOREIGN]
    assert OTHER_SUB in body["outOfScope"][0]["why"] and SUB in body["error"]
    async with QueueClient.from_connection_string(env["AzureWebJobsStorage"], WORK_QUEUE) as queue:
        assert await queue.peek_messages(max_messages=32) == []


async def test_a_check_answers_503_with_retry_after_when_the_queue_is_unreachable(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey="
        + "QQ=="
        + (
            ";QueueEndpoint=http://127.0.0.1:9/devstoreaccount1;TableEndpoint=http://127.0.0.1:9/devstoreaccount1"
        )
    )
    monkeypatch.setenv("AzureWebJobsStorage", dead)
    monkeypatch.setattr("shared.recheck.CHECK_DEADLINE_S", 1.0)
    monkeypatch.setattr("shared.triggers._created", set())
    code, body, headers = await post_check({"vmId": vm_id("web-01")})
    assert code == 503 and headers.get("Retry-After") == "30"
    assert "retry later" in body["error"]


def test_parse_check_request_keeps_order_and_drops_repeats_by_arm_rules() -> None:
    ids = [vm_id("b"), vm_id("a"), vm_id("B")]
    assert [str(v) for v in parse_check_request(json.dumps({"vmIds": ids}).encode())] == ids[:2]
