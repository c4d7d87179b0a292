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
