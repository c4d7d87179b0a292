"""The engine's and the simulator's CPU per request (issue 12's sweep bench, docs/performance.md):
work that was done once per VM, or once per page, and is now done once.

Each test counts the work itself (documents built, scripts encoded, headers read), not time, so
it does not depend on the machine's load.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.transport import HttpRequest as TransportRequest

from shared.azure import compute, transient
from shared.azure.compute import RunCommandRetryPolicy, encoded_body
from shared.guest.scripts import REMEDIATE, conditional_rekey_command, detect_command, remediate_command
from simulator import Estate, arm, monitor
from simulator.arm import Compute
from simulator.monitor import ResourceGraph

LISTING = (
    "Resources | where type =~ 'microsoft.compute/virtualmachines' "
    "| where tostring(properties.storageProfile.osDisk.osType) =~ 'Windows' "
    "| project id, name, powerState = tostring(properties.extended.instanceView.powerState.code) "
    "| order by id asc"
)


def _graph(count: int) -> tuple[Compute, ResourceGraph]:
    estate = Estate.from_dict({"generate": {"count": count, "seed": 7, "subscriptions": 2}})
    sim = Compute(estate)
    return sim, ResourceGraph(sim)


def _query(graph: ResourceGraph, options: dict[str, Any]) -> dict[str, Any]:
    answer = graph.handle(json.dumps({"query": LISTING, "options": options}).encode())
    assert answer.status == 200, answer.body
    body = answer.body
    assert isinstance(body, dict)
    return body


def _list_all(graph: ResourceGraph, top: int) -> list[dict[str, Any]]:
    pages = [_query(graph, {"$top": top})]
    while "$skipToken" in pages[-1]:
        pages.append(_query(graph, {"$top": top, "$skipToken": pages[-1]["$skipToken"]}))
    return pages


def test_a_resource_graph_listing_builds_each_vm_s_document_once_for_all_its_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each page built every VM's document again: a 10-page listing of 10,000 VMs built 100,000,
    seconds of the simulator's one event loop while every ARM answer waited."""
    built: list[str] = []
    real = monitor._graph_document

    def counting(view: Any) -> dict[str, Any]:
        built.append(view.spec.id)
        return real(view)

    monkeypatch.setattr(monitor, "_graph_document", counting)
    sim, graph = _graph(40)
    vms = len(sim.snapshot())  # every VM's document is built, then the query's filters apply
    built.clear()
    pages = _list_all(graph, top=10)
    ids = [row["id"] for page in pages for row in page["data"]]
    assert len(pages) == 4 and len(ids) == pages[0]["totalRecords"] == len(set(ids)) and ids == sorted(ids)
    assert len(built) == vms == 40  # once per VM, not once per VM and page (160)
    # A new listing (a first page, no token) is built from the estate as it is now.
    gone = ids[0]
    sim.delete_vm(gone)
    again = [row["id"] for page in _list_all(graph, top=10) for row in page["data"]]
    assert again == ids[1:] and len(built) == 40 + 39
    # A token that names no listing the simulator keeps (as a client may make one up): served
    # from the estate as it is, as before.
    forged = monitor._encode_token(20)
    assert [row["id"] for row in _query(graph, {"$top": 10, "$skipToken": forged})["data"]] == ids[21:31]


def test_the_run_command_script_is_encoded_once_for_every_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every VM's Run Command carries the same 25 KB script; encoding it per VM was the largest single
    cost of a Run Command's CPU in the engine. The bytes sent are json.dumps' own."""
    compute._encoded_lines.cache_clear()
    encodes: list[int] = []
    real_dumps = json.dumps

    def counting(value: Any, **kwargs: Any) -> str:
        if isinstance(value, list) and len(value) > 100:
            encodes.append(len(value))
        return real_dumps(value, **kwargs)

    bodies = [
        conditional_rekey_command(
            product_key=f"ABCDE-ABCDE-ABCDE-ABCDE-ABCD{n}",
            kms_host="kms.core.windows.net",
            kms_port=1688,
            channel_token="VOLUME_KMSCLIENT",
            edition_ids=("ServerDatacenter",),
            skus=(8,),
            build=20348,
            product_types=(3,),
            refused_key_channels=("Retail",),
        )
        for n in range(5)
    ]
    bodies.append(remediate_command(product_key=None, kms_host="kms.contoso.com", kms_port=1688))
    bodies.append(detect_command("kms.core.windows.net", 1688))
    monkeypatch.setattr(compute.json, "dumps", counting)
    sent = [encoded_body(body) for body in bodies]
    monkeypatch.undo()
    assert sent == [json.dumps(dict(b), separators=(",", ":")).encode() for b in bodies]
    assert encodes == [len(REMEDIATE.lines), len(detect_command("h", 1)["script"])]  # once per script
    # Bodies of other shapes encode exactly as json.dumps does too.
    for odd in ({"script": "text"}, {"a": [1, {"b": None}], "script": ["é", '"q"', 1]}, {"script": [{}]}, {}):
        assert encoded_body(odd) == json.dumps(odd, separators=(",", ":")).encode()


def _answer(status: int, method: str, headers: dict[str, str]) -> PipelineResponse[Any, Any]:
    class Answer:
        status_code = status

        def __init__(self) -> None:
            self.headers = headers

    request = PipelineRequest(TransportRequest(method, "https://management.azure.com/x"), None)  # type: ignore[arg-type]
    return PipelineResponse(request.http_request, Answer(), None)  # type: ignore[arg-type]


def test_the_retry_policy_reads_no_header_of_an_answer_under_400(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every answer passes the retry policy; a 200 or 202 is never retried (azure-core's own first
    test), so its Retry-After (every 202 of a Run Command, every poll in progress has one) is not
    parsed for nothing. An error answer still is."""
    read: list[int] = []
    real = transient.wait_from_headers

    def counting(headers: Any) -> float | None:
        read.append(1)
        return real(headers)

    monkeypatch.setattr(transient, "wait_from_headers", counting)  # the policy's (BoundedRetryPolicy)
    policy = RunCommandRetryPolicy(max_wait_s=5)
    settings = policy.configure_retries({})
    for status, method in ((200, "GET"), (202, "POST"), (202, "GET")):
        assert not policy.is_retry(settings, _answer(status, method, {"Retry-After": "1"}))
    assert read == []
    assert policy.is_retry(settings, _answer(503, "GET", {"Retry-After": "1"}))
    assert not policy.is_retry(settings, _answer(503, "GET", {"Retry-After": "60"}))  # longer than 5 s
    assert not policy.is_retry(settings, _answer(500, "POST", {}))
    assert policy.is_retry(settings, _answer(429, "POST", {"Retry-After": "1"}))
    assert len(read) == 3


def test_the_simulator_reads_a_script_s_kind_from_its_first_line_and_checks_its_lines() -> None:
    """The simulator's Run Command checks stay what ARM's are (every line a string) and the script's
    kind is its first non-blank line's, however the lines are split."""
    marker = REMEDIATE.lines[0]
    assert arm._script_kind(REMEDIATE.lines) == "remediate"
    assert arm._script_kind(("", "  \r\n", "\ufeff" + marker)) == "other"  # a BOM only leads the text
    assert arm._script_kind(("\ufeff\ufeff", "", " " + marker + "\r\nrest")) == "remediate"
    assert arm._script_kind(("x", marker)) == "other" and arm._script_kind(()) == "other"
    for bad in ([1], ["a", None], ["a", ["b"]], [True], "text"):
        raw = json.dumps({"commandId": "RunPowerShellScript", "script": bad}).encode()
        answer = arm._run_command_input(raw)
        assert isinstance(answer, arm.ArmResponse) and answer.status == 400
    assert arm._run_command_input(b'{"commandId": "RunPowerShellScript", "script": ["a", "b"]}') == (
        "RunPowerShellScript",
        ("a", "b"),
        (),
    )
