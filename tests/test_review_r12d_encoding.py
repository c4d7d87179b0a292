"""Review r12d: ``encoded_body`` (p12, shared/azure/compute.py) sends exactly the bytes json.dumps
gives for each VM's body, whatever came before it: its cache of a script's encoding is keyed by the
script's lines, and lines that compare equal without encoding alike (1, 1.0, True) must not share
an entry; keys json.dumps spells its own way (true, null) are spelled so.
"""

from __future__ import annotations

import json
from typing import Any

from shared.azure import compute
from shared.azure.compute import encoded_body
from shared.guest.scripts import remediate_command


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def test_scripts_whose_lines_compare_equal_but_encode_apart_are_each_encoded_as_they_are() -> None:
    compute._encoded_lines.cache_clear()
    bodies: list[dict[Any, Any]] = [
        {"commandId": "RunPowerShellScript", "script": ["a", 1]},
        {"commandId": "RunPowerShellScript", "script": ["a", True]},
        {"commandId": "RunPowerShellScript", "script": ("a", 1.0)},
        {"commandId": "RunPowerShellScript", "script": ["a", 1]},
    ]
    assert [encoded_body(b) for b in bodies] == [_dumps(b) for b in bodies]


def test_keys_json_spells_its_own_way_are_spelled_as_json_dumps_does() -> None:
    for body in ({True: 1}, {None: "x", "script": ["a"]}, {1: 2, 1.5: 3}):
        assert encoded_body(body) == _dumps(body)


def test_each_vm_s_parameters_are_its_own_after_the_script_is_cached() -> None:
    """The mutant that reuses the first VM's encoded parameters for every VM (the script is shared,
    the parameters are not): every body is json.dumps' own, in any order, twice."""
    compute._encoded_lines.cache_clear()
    bodies = [
        remediate_command(product_key=None, kms_host=f"kms{n}.contoso.com", kms_port=1688 + n)
        for n in range(4)
    ]
    for _ in range(2):
        for body in reversed(bodies):
            assert encoded_body(body) == _dumps(dict(body))
    assert compute._encoded_lines.cache_info().misses == 1
