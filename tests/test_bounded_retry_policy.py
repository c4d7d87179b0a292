"""The retry policy every client but Compute's uses (Resource Graph, Log Analytics, the network
reads): Compute's ``RunCommandRetryPolicy`` is the same policy plus its rule for POSTs.

azure-core's ``AsyncRetryPolicy.get_retry_after`` parses ``Retry-After`` with ``parse_retry_after``,
which raises ``ValueError`` on a value it cannot read (azure-sdk-for-python
sdk/core/azure-core/azure/core/pipeline/policies/_utils.py), out of the invocation: the review of
issue 9 (r9b) found it for Compute; Resource Graph's and the others' clients had kept azure-core's.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from azure.core.pipeline.policies import AsyncRetryPolicy

from shared.azure.compute import RunCommandRetryPolicy
from shared.azure.transient import BoundedRetryPolicy


def answer(status: int, headers: dict[str, str], method: str = "GET") -> Any:
    return SimpleNamespace(
        http_response=SimpleNamespace(status_code=status, headers=headers),
        http_request=SimpleNamespace(method=method),
    )


def test_azure_cores_own_reading_of_an_unreadable_retry_after_raises() -> None:
    with pytest.raises(ValueError, match="Invalid HTTP date"):
        AsyncRetryPolicy().get_retry_after(answer(429, {"Retry-After": "soon"}))


@pytest.mark.parametrize("policy", [BoundedRetryPolicy, RunCommandRetryPolicy])
def test_an_unreadable_retry_after_names_no_wait_and_raises_nothing(policy: type[BoundedRetryPolicy]) -> None:
    assert policy().get_retry_after(answer(429, {"Retry-After": "soon"})) is None
    assert policy().get_retry_after(answer(429, {"retry-after-ms": "1500"})) == 1.5


@pytest.mark.parametrize("policy", [BoundedRetryPolicy, RunCommandRetryPolicy])
def test_a_wait_beyond_the_bound_is_handed_back_and_a_short_one_retried(
    policy: type[BoundedRetryPolicy],
) -> None:
    settings = {"total": 3, "connect": 3, "read": 3, "status": 3, "methods": {"GET"}}
    bounded = policy(max_wait_s=30.0)
    assert not bounded.is_retry(settings, answer(429, {"Retry-After": "1200"}))
    assert bounded.is_retry(settings, answer(429, {"Retry-After": "2"}))
    assert not bounded.is_retry(settings, answer(202, {"Retry-After": "2"}))


def test_only_compute_refuses_to_retry_a_post_after_a_server_error() -> None:
    settings = {"total": 3, "connect": 3, "read": 3, "status": 3, "methods": {"GET", "POST"}}
    assert not RunCommandRetryPolicy().is_retry(settings, answer(500, {}, "POST"))
    assert RunCommandRetryPolicy().is_retry(settings, answer(429, {"Retry-After": "1"}, "POST"))
