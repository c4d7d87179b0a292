"""The CLI's exit codes, one meaning each, so that a script can act on them (README, ``--help``).

0    all done: every VM in scope was handled (healthy, remediated, would-remediate, skipped)
1    some VM failed, a VM you named does not exist, or a subscription could not be listed: look at
     it, a retry alone will not do
2    usage, configuration or credential error: nothing was checked
3    nothing failed, but some VM must be retried later (deferred: busy, throttled, agent not ready)
130  interrupted (SIGINT or SIGTERM): the results so far were printed and written
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.model import Outcome, OutcomeKind

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RETRY_LATER = 3
EXIT_INTERRUPTED = 130


def run_exit_code(
    outcomes: Iterable[Outcome], *, listing_errors: bool = False, named_missing: bool = False
) -> int:
    """The exit code of a run that got this far: 1 before 3 before 0.

    ``named_missing``: a VM the caller named (by id or computer name) does not exist. That is an
    error for the caller, not a success, and the name was asked of Azure (so not a usage error, 2,
    which means nothing was checked; other named VMs may have been handled): 1.
    """
    kinds = {o.kind for o in outcomes}
    if OutcomeKind.FAILED in kinds or listing_errors or named_missing:
        return EXIT_FAILED
    if OutcomeKind.DEFERRED in kinds:
        return EXIT_RETRY_LATER
    return EXIT_OK
