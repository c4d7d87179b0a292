"""Review of issue 9 (items 3 and 10): hostile input that still got through.

- A time with a UTC offset at the edge of the calendar (``0001-01-01T00:00:00+01:00`` is a valid
  ISO 8601 time for ``datetime.fromisoformat``, but it is the year 0 in UTC) made intake raise
  ``OverflowError``, which is no ``ValueError``: the alert webhook failed with a 500, which an
  action group does not retry (articles/azure-monitor/alerts/action-groups.md, "Webhook": only
  408, 429, 503 and 504), so the alert was lost and recorded nowhere.
- A lone UTF-16 surrogate (``"\\ud800"`` in the JSON of an alert) passed the computer-name check, so
  such a name was queued; the ledger's key for ``computer:<name>`` then raised
  ``UnicodeEncodeError`` (a surrogate has no UTF-8 form), so the worker failed five times and the
  item ended ``failed: poison`` under the poison handler's fallback target. Item 3 asks that a
  hostile name be ignored with a reason at intake, never enqueued.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import azure.functions as func
import pytest

from shared.intake import from_alert, from_log_rows
from shared.ledger import target_key
from shared.model import VmId, WorkItem, is_computer_name
from tests.payloads import dim, v2_alert
from tests.test_function_app import app_env, drain, sim, user, vm_id

__all__ = ["app_env", "sim"]

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
EDGE_TIMES = ["0001-01-01T00:00:00+01:00", "0001-01-01T00:30:00+00:45"]


@pytest.mark.parametrize("fired", EDGE_TIMES)
def test_an_alert_fired_at_an_edge_of_the_calendar_still_names_its_vm(fired: str) -> None:
    alert = v2_alert(dimensions=[dim("_ResourceId", vm_id("web-01"))], targets=[])
    alert["data"]["essentials"]["firedDateTime"] = fired
    result = from_alert(alert, now=NOW)  # raised OverflowError
    assert [str(i.vm_id) for i in result.items] == [vm_id("web-01")]
    # an evidence time that is no usable time is left out (firstSeen stands in, which is later)
    assert result.items[0].evidence_at in ("", "0001-01-01T00:00:00Z")


@pytest.mark.parametrize("generated", EDGE_TIMES)
def test_a_log_row_timed_at_an_edge_of_the_calendar_does_not_stop_the_scan(generated: str) -> None:
    rows = [{"_ResourceId": vm_id("web-01"), "Computer": "web-01", "TimeGenerated": generated}]
    result = from_log_rows(rows, now=NOW, source="log-scan:t")  # raised OverflowError
    assert [str(i.vm_id) for i in result.items] == [vm_id("web-01")]


async def test_the_alert_webhook_answers_an_edge_of_the_calendar_time_with_202_not_a_500(
    app_env: dict[str, str],
) -> None:
    alert = v2_alert(dimensions=[dim("_ResourceId", vm_id("web-01"))], targets=[])
    alert["data"]["essentials"]["firedDateTime"] = EDGE_TIMES[0]
    request = func.HttpRequest(method="POST", url="/api/alerts", body=json.dumps(alert).encode())
    response = await user("alert_webhook")(request)  # raised: the host would have answered 500
    assert response.status_code == 202


# --- lone surrogates ------------------------------------------------------------------------------


def test_no_text_check_lets_a_lone_surrogate_through() -> None:
    assert not is_computer_name("db\ud800")
    assert VmId.try_parse(vm_id("web-01") + "\udc00") is None
    with pytest.raises(ValueError, match="computer must be"):
        WorkItem.from_dict({"reason": "alert", "computer": "db\ud800"})


def test_every_target_has_a_table_key_even_with_a_lone_surrogate() -> None:
    key = target_key("computer:db\ud800")  # raised UnicodeEncodeError
    assert key.startswith("t|") and key.encode("utf-8")


async def test_an_alert_naming_a_computer_with_a_lone_surrogate_is_answered_and_queues_nothing(
    app_env: dict[str, str],
) -> None:
    alert: dict[str, Any] = v2_alert(dimensions=[dim("Computer", "DB-03\ud800")], targets=[])
    body = json.dumps(alert).encode()  # ASCII JSON: the surrogate travels as the escape \ud800
    response = await user("alert_webhook")(func.HttpRequest(method="POST", url="/api/alerts", body=body))
    assert response.status_code == 202
    answer = json.loads(response.get_body())
    assert answer["items"] == []  # was queued, then failed five times in the worker
    assert any("is not a computer name" in reason for reason in answer["ignored"])
    assert await drain(app_env) == []
