"""The ledger: a lease per VM, its last verdict and an append-only history, in Azure Table storage.

Why it exists: queue deliveries are at-least-once and many workers run at once, so a lease (ETag
optimistic concurrency) makes sure one VM never has two workflows, hence never two Run Commands;
the last verdict lets the sweep skip VMs verified within ``RECHECK_AFTER``; the history proves what
was done to each VM, why, and under which correlation id.

Table design (one table, ``settings.ledger_table``; identity-based in Azure, Azurite locally):

==================  =========================  =============================  =======================
row                 PartitionKey               RowKey                         written by
==================  =========================  =============================  =======================
state (one per VM)  ``vm``                     VM key                         acquire / renew / release
history by target   ``h-<target key>``         ``<inverted ticks>-<random>``  record / record_event
history by day      ``d-<inverted day>``       the same RowKey                record / record_event
==================  =========================  =============================  =======================

- **VM key**: ``<subscription>|<resource group>|<name>``, lower-cased, so ids that differ only in
  case (ARM ignores case) share one row. The parts cannot hold ``/ \\ # ?`` or control characters
  (``VmId`` validates them) nor ``|``, so the key is valid and unambiguous. A target that is not a
  VM id (a computer name, garbage from a poison message) becomes ``t|`` + its lower-cased text
  percent-encoded with ``!`` for ``%`` (long ones end in a hash), so its row is never refused.
- **State rows share one partition** so that ``verified_since`` and ``status`` are one query each.
  Columns: ``vmId``, ``leaseOwner``/``leaseToken``/``leaseUntil`` (an empty owner or a past
  ``leaseUntil`` means free), ``outcome``/``reason``/``hint``/``decidedAt``, ``verifiedAt`` (only
  for outcomes that observed the VM; a deferral keeps the previous one), ``runs``,
  ``consecutiveDeferrals``, ``consecutiveFailures``.
- **Lease**: no row → ``create_entity`` (409: another worker created it first); a free or expired
  lease → merge with the row's ETag and ``IfNotModified`` (412: another worker won). A live lease is
  never re-entered, not even by the same owner: two deliveries handled by one host are still two.
  Renew and release are conditional on the ETag of our own last write, so a worker whose lease
  expired and was taken over can neither extend nor free the new holder's lease.
- **History** rows are only ever inserted. Each is written twice with the same RowKey: in the
  target's partition (``history``) and in the day's partition (``status``' recent list). Inverted
  .NET ticks make the newest sort first inside a partition, and the inverted day number makes the
  newest day sort first across partitions, so "most recent N" is one range query that stops early.
  Day partitions also make a retention clean-up a per-partition delete.
"""

from __future__ import annotations

from shared.ledger._table import (
    DETAILS_MAX_CHARS,
    MARKER_PARTITION,
    STATE_PARTITION,
    LeaseLost,
    LedgerError,
    TableMissing,
    storage_unavailable,
    target_key,
    vm_key,
)
from shared.ledger.history import HistoryStore
from shared.ledger.lease import Lease, LeaseStore
from shared.ledger.verdicts import VERIFYING, Verdict, VerdictStore


class Ledger(LeaseStore, VerdictStore, HistoryStore):
    """Async access to the ledger table. Safe to share between tasks; one per worker process.

    Its three concerns live in their own modules: the lease (``lease.py``), the verdict and the
    queries over state rows (``verdicts.py``), the history (``history.py``); ``_table.py`` holds the
    table client, keys, errors and the retried write they share.
    """


__all__ = [
    "DETAILS_MAX_CHARS",
    "MARKER_PARTITION",
    "STATE_PARTITION",
    "VERIFYING",
    "Lease",
    "LeaseLost",
    "Ledger",
    "LedgerError",
    "TableMissing",
    "Verdict",
    "storage_unavailable",
    "target_key",
    "vm_key",
]
