"""Review r14: r10c's group check and Resource Graph error text, mutants no test killed.

Azure/azure-powershell src/ResourceGraph/ResourceGraph.Test/ScenarioTests/ResourceGraphQueryTests.ps1
(``Search-AzureRmGraph-QueryError``): an invalid query's answer has more than one detail.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError

from shared.azure import inventory
from shared.azure.inventory import InventoryError
from shared.cli import UsageError, _check_group


def test_every_detail_of_a_resource_graph_error_is_on_its_first_line() -> None:
    body = {
        "error": {
            "code": "BadRequest",
            "message": "Please provide below info when asking for support: timestamp = t, correlationId = c.",
            "details": [
                {"code": "InvalidQuery", "message": "Query is invalid. Please refer to the documentation."},
                {"code": "ParserFailure", "message": "ParserFailure, line 1: unexpected token"},
            ],
        }
    }

    class Answer:
        status_code, reason, request, headers = 400, "Bad Request", None, {}

        def text(self) -> str:
            return json.dumps(body)

    first = str(inventory._translate(HttpResponseError(response=Answer()))).splitlines()[0]
    assert "(InvalidQuery) Query is invalid" in first
    assert "(ParserFailure) ParserFailure, line 1: unexpected token" in first


async def test_a_group_listing_that_fails_without_an_http_answer_names_no_http_status() -> None:
    """An InventoryError with no status (the listing's own check, not an answer): exit 2 with
    _inventory_problem's line, not "Resource Graph answered HTTP None"."""

    class Failing:
        async def group_subscriptions(self) -> list[str]:
            raise InventoryError(
                "Resource Graph gave a $skipToken again after 0 rows", code="SkipTokenRepeated"
            )

    settings: Any = type("S", (), {"management_group": "mg-1"})()
    with pytest.raises(UsageError) as raised:
        await _check_group(Failing(), settings)  # type: ignore[arg-type]
    assert "HTTP None" not in str(raised.value)
    assert "MANAGEMENT_GROUP_ID=mg-1" in str(raised.value)
