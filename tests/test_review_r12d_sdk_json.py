"""Review r12d: one ``sdk_json`` (shared/azure/transport.py, 2423ce8) for the REST JSON of an SDK
model. A model it cannot read is an error (never an empty document judged as if ARM had said
nothing: a NIC with no subnet, an NSG with no rules); the network gateway tells it as
``NetworkUnreadable`` (the path unknown), and only that: a TypeError raised by the call itself is a
defect of the call, not an answer of ARM's, and is not hidden as an unreadable network.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared.azure.network import NetworkGateway, NetworkUnreadable
from shared.azure.transport import sdk_json


class _Model:
    def __init__(self, value: Any) -> None:
        self.value = value

    def as_dict(self) -> Any:
        return self.value


def test_sdk_json_reads_a_mapping_or_a_model_and_refuses_anything_else() -> None:
    assert sdk_json({"id": "x"}) == {"id": "x"}
    assert sdk_json(_Model({"id": "y"})) == {"id": "y"}
    for odd in (None, "text", ["id"], _Model(["id"]), object()):
        with pytest.raises(TypeError):
            sdk_json(odd)


def _call(result: Any = None, raises: BaseException | None = None) -> Any:
    gateway = object.__new__(NetworkGateway)  # _call reads nothing of the gateway's

    async def call() -> Any:
        if raises is not None:
            raise raises
        return result

    return asyncio.run(gateway._call("read of nic1", call))


def test_the_network_gateway_tells_an_unreadable_model_as_unreadable_and_a_bug_as_a_bug() -> None:
    assert _call(_Model({"id": "nic1"})) == {"id": "nic1"}
    with pytest.raises(NetworkUnreadable, match="read of nic1: unexpected SDK model"):
        _call(object())
    with pytest.raises(TypeError, match="unexpected keyword"):
        _call(raises=TypeError("get() got an unexpected keyword argument 'expand'"))
