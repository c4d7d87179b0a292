"""The CLI's exit codes, one meaning each, so that a script can act on them (README, ``--help``).

0    all done: every VM in scope was handled (healthy, remediated, would-remediate, skipped)
1    some VM failed (or a subscription could not be listed): look at it, a retry alone will not do
2    usage, configuration or credential error: nothing was checked
3    nothing failed, but some VM must be retried later (deferred: busy, throttled, agent not ready)
130  interrupted (SIGINT or SIGTERM): the results so far were printed and written
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RETRY_LATER = 3
EXIT_INTERRUPTED = 130
