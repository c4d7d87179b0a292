"""Review of issue 13: what docs/operations.md "What is logged" promises of an outcome record."""

from __future__ import annotations

import json
import logging

import pytest

from shared import telemetry
from shared.model import Outcome, OutcomeKind


def test_a_failed_outcome_is_a_warning_the_others_information_and_the_hint_is_capped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=telemetry.log.name)
    long_hint = "x" * (telemetry.HINT_MAX_CHARS + 500)
    telemetry.log_outcome(
        Outcome("vm-a", OutcomeKind.FAILED, "r", long_hint), trigger="t", correlation_id="c"
    )
    telemetry.log_outcome(Outcome("vm-b", OutcomeKind.REMEDIATED, "r"), trigger="t", correlation_id="c")
    failed, remediated = caplog.records
    assert (failed.levelno, remediated.levelno) == (logging.WARNING, logging.INFO)
    record = json.loads(failed.getMessage()[len(telemetry.PREFIX) :])
    assert len(record["hint"]) == telemetry.HINT_MAX_CHARS
    assert len(failed.__dict__["hint"]) == telemetry.HINT_MAX_CHARS  # the dimension too
    assert "durationS" not in failed.__dict__  # None: no attribute (OpenTelemetry has no null)
