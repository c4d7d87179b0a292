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
