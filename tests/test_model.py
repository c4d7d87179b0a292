"""VM ids: parsed strictly, compared the way ARM compares them (case-insensitively)."""

from __future__ import annotations

import pytest

from shared.model import InvalidVmId, Outcome, OutcomeKind, VmId

SUB = "11111111-1111-1111-1111-111111111111"
ID = f"/subscriptions/{SUB}/resourceGroups/Prod-RG/providers/Microsoft.Compute/virtualMachines/web-01"


def test_parse_and_render() -> None:
    vm = VmId.parse(ID)
    assert (vm.subscription_id, vm.resource_group, vm.name) == (
        "11111111-1111-1111-1111-111111111111",
        "Prod-RG",
        "web-01",
    )
    assert str(vm) == ID


def test_equality_and_hash_ignore_case_like_arm() -> None:
    lower = VmId.parse(ID.lower())
    assert lower == VmId.parse(ID)
    assert len({lower, VmId.parse(ID), VmId.parse(ID.upper().replace("SUBSCRIPTIONS", "subscriptions"))}) == 1
    # the form Event Grid and alerts use: lower-case segment names
    assert (
        VmId.try_parse(
            ID.replace("resourceGroups", "resourcegroups").replace("Microsoft.Compute", "microsoft.compute")
        )
        == lower
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/subscriptions/x/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm",
        "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/sa",
        "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm/extensions/x",
        "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/bad name",
        "/subscriptions/11111111-1111-1111-1111-111111111111/resourcegroups/rg/providers/microsoft.operationalinsights/workspaces/ws",
    ],
)
def test_rejects_what_is_not_a_vm_id(text: str) -> None:
    with pytest.raises(InvalidVmId):
        VmId.parse(text)
    assert VmId.try_parse(text) is None


def test_try_parse_tolerates_non_strings() -> None:
    assert VmId.try_parse(None) is None
    assert VmId.try_parse(42) is None


def test_outcome_as_dict_uses_the_outcome_words() -> None:
    o = Outcome(
        ID, OutcomeKind.WOULD_REMEDIATE, "avma-channel", details={"edition": "Windows Server 2022 Datacenter"}
    )
    assert o.as_dict() == {
        "id": ID,
        "outcome": "would-remediate",
        "reason": "avma-channel",
        "edition": "Windows Server 2022 Datacenter",
    }


# --- issue 9, items 3 and 10: hostile ids and hostile queue messages ------------------------------

BASE = f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/"
HOSTILE_IDS = [
    BASE + "vm1\n",  # ``$`` matches before a trailing newline
    BASE + "vm1\n/",
    BASE + "vm1/\n",
    BASE.replace("/rg/", "/rg\n/") + "vm1",
    BASE.replace(SUB, SUB + "\n") + "vm1",
    BASE + "vm\x001",
    BASE + "vm1\x1b[2J",
    BASE + "vm1\u0085",
    " " + BASE + "vm1",
    BASE + "vm1 ",
    "\t" + BASE + "vm1",
]


@pytest.mark.parametrize("text", HOSTILE_IDS)
def test_ids_with_whitespace_or_control_characters_are_refused(text: str) -> None:
    with pytest.raises(InvalidVmId):
        VmId.parse(text)
    assert VmId.try_parse(text) is None


def test_is_guid_full_matches() -> None:
    from shared.model import is_guid

    assert is_guid(SUB)
    assert not is_guid(SUB + "\n")


def _message(**fields: object) -> dict[str, object]:
    return {"reason": "alert", "vmId": ID, **fields}


@pytest.mark.parametrize(
    "fields",
    [
        {"vmId": BASE + "vm1\n/"},
        {"vmId": None, "computer": "web-01\n"},
        {"vmId": None, "computer": "web\x0001"},
        {"vmId": None, "computer": "web 01"},
        {"vmId": None, "computer": " web-01"},
        {"firstSeen": "yesterday"},
        {"firstSeen": 12},
        {"evidenceAt": "yesterday"},
        {"evidenceAt": 12},
        {"evidenceAt": "2026-01-01T00:00:00Z\n"},
    ],
)
def test_a_hostile_queue_message_is_not_a_work_item(fields: dict[str, object]) -> None:
    from shared.model import WorkItem

    with pytest.raises(ValueError, match=r"whitespace|control|computer|firstSeen|evidenceAt"):
        WorkItem.from_dict(_message(**fields))


def test_a_huge_attempt_is_clamped_and_free_text_loses_its_control_characters() -> None:
    from shared.model import MAX_ATTEMPT, WorkItem

    item = WorkItem.from_dict(_message(attempt=1024, correlationId="c\r\n1", source="rule\x1b x"))
    assert item.attempt == MAX_ATTEMPT
    assert (item.correlation_id, item.source) == ("c1", "rule x")
    assert 300.0 * 2**item.attempt > 0  # the worker's delay formula no longer overflows


def test_a_first_seen_in_the_future_is_brought_back_to_now() -> None:
    from datetime import UTC, datetime, timedelta

    from shared.model import WorkItem

    now = datetime(2026, 1, 1, tzinfo=UTC)
    future = WorkItem.from_dict(_message(firstSeen=(now + timedelta(days=3650)).isoformat()))
    assert datetime.fromisoformat(future.clamped(now).first_seen) == now
    past = WorkItem.from_dict(_message(firstSeen="2025-12-31T00:00:00Z"))
    assert past.clamped(now) is past


def test_the_evidence_time_round_trips_and_one_in_the_future_is_brought_back_to_now() -> None:
    from datetime import UTC, datetime, timedelta

    from shared.model import WorkItem

    now = datetime(2026, 1, 1, tzinfo=UTC)
    item = WorkItem.from_dict(_message(evidenceAt="2025-12-31T23:59:00Z", firstSeen="2026-01-01T00:00:00Z"))
    assert item.evidence_at == "2025-12-31T23:59:00Z"
    assert WorkItem.from_dict(item.to_dict()) == item
    assert item.clamped(now) is item
    future = WorkItem.from_dict(_message(evidenceAt=(now + timedelta(days=1)).isoformat()))
    assert datetime.fromisoformat(future.clamped(now).evidence_at) == now
    assert "evidenceAt" not in WorkItem.from_dict(_message()).to_dict()  # absent when unknown
