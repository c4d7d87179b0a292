"""Review of issue 13 (GET /api/status): hostile ``since`` values are a 400 naming the parameter."""

from __future__ import annotations

import pytest

from shared.status import StatusQuery, StatusQueryError


@pytest.mark.parametrize(
    "since",
    [
        "9999-12-31T23:00:00-05:00",  # a valid ISO time whose UTC form is after year 9999
        "0001-01-01T00:00:00+01:00",  # ... or before year 1
    ],
)
def test_an_iso_since_outside_the_representable_range_is_refused_not_an_overflow(since: str) -> None:
    with pytest.raises(StatusQueryError) as raised:
        StatusQuery.from_params({"since": since})
    (problem,) = raised.value.problems
    assert problem.startswith("since=") and "out of range" in problem


def test_the_extreme_iso_times_that_do_convert_still_filter() -> None:
    query = StatusQuery.from_params({"since": "9999-12-31T23:00:00Z"})
    assert query.since is not None and query.since.year == 9999


def test_a_token_issued_for_one_since_is_refused_with_another() -> None:
    from shared.status import encode_token

    first = StatusQuery.from_params({"since": "24h"})
    token = encode_token("k", first.fingerprint())
    assert StatusQuery.from_params({"since": "24h", "continuation": token}).after == "k"
    with pytest.raises(StatusQueryError, match="continuation"):
        StatusQuery.from_params({"since": "1h", "continuation": token})


def test_a_reason_prefix_matches_the_start_of_the_reason_only() -> None:
    query = StatusQuery.from_params({"reason": "activation-error:*"})
    row = {"outcome": "failed", "vmId": "", "decidedAt": None}
    assert query.keeps({**row, "reason": "activation-error:0xC004F074"})
    assert not query.keeps({**row, "reason": "pre-activation-error:0xC004F074"})
