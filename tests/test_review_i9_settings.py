"""Review of issue 9 (item 2): the ``functionTimeout`` override is read as the host reads it.

The host.json reference (articles/azure-functions/functions-host-json.md, "functionTimeout"): the
value "follows the timespan string format", ``[d.]hh:mm:ss`` with hours 0-23 ("when you need to
set a 24-hour timeout, you must define it as one day (``"1.00:00:00"``) instead of 24 hours"), and
"a value of ``-1`` indicates unbounded execution" (allowed on Flex Consumption, Premium and
Dedicated plans; functions-scale.md, "Function app timeout duration"). The engine's check read only
``hh:mm:ss`` with any two-digit hour: it refused ``-1`` and ``1.00:00:00``, which the host accepts,
so every trigger of an app configured so failed at start with ``ConfigError``; and it accepted
``24:00:00`` to ``99:59:59``, which the host's timespan format does not allow.
"""

from __future__ import annotations

import math

import pytest

from shared.settings import ConfigError, Settings

OVERRIDE = "AzureFunctionsJobHost__functionTimeout"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("01:00:00", 3600.0),
        ("1.00:00:00", 86400.0),
        ("0.02:30:00", 9000.0),
        ("23:59:59", 86399.0),
        ("-1", math.inf),
    ],
)
def test_every_function_timeout_the_host_accepts_is_read(text: str, seconds: float) -> None:
    assert Settings.from_env({OVERRIDE: text}).function_timeout_s == seconds


@pytest.mark.parametrize("text", ["24:00:00", "99:59:59", "1.24:00:00", "00:60:00", "-2", "forever"])
def test_a_function_timeout_the_host_would_not_read_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=OVERRIDE):
        Settings.from_env({OVERRIDE: text})
