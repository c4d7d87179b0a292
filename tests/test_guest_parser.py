"""parse_result: the one marked JSON line is found in noisy, truncated output and checked strictly."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.guest.facts import (
    RESULT_MARKER,
    Channel,
    GuestOutputError,
    GuestResult,
    LicenseStatus,
    parse_result,
)

CONTRACT = Path(__file__).resolve().parents[1] / "docs" / "guest-contract.md"


def detect_doc() -> dict[str, Any]:
    """A detection result as a Server 2022 Datacenter VM on AVMA prints it."""
    return {
        "schema": 2,
        "script": "detect",
        "os": {
            "caption": "Microsoft Windows Server 2022 Datacenter",
            "version": "10.0.20348",
            "build": 20348,
            "productType": 3,
            "sku": 8,
            "editionId": "ServerDatacenter",
        },
        "license": {
            "name": "Windows(R), ServerDatacenter edition",
            "description": "Windows(R) Operating System, VIRTUAL_MACHINE_ACTIVATION channel",
            "productKeyChannel": None,
            "partialProductKey": "DV9BG",
            "licenseStatus": 5,
            "graceMinutes": 0,
            "kmsMachine": None,
            "kmsPort": 0,
            "discoveredKmsMachine": None,
            "discoveredKmsPort": 0,
        },
        "kmsProbe": {"host": "azkms.core.windows.net", "port": 1688, "reachable": True, "error": None},
        "attestation": None,
        "steps": [],
        "error": None,
    }


def remediate_doc() -> dict[str, Any]:
    doc = detect_doc()
    doc["script"] = "remediate"
    doc["license"].update(
        description="Windows(R) Operating System, VOLUME_KMSCLIENT channel",
        productKeyChannel="Volume:GVLK",
        partialProductKey="6VM33",
        licenseStatus=1,
        graceMinutes=259200,
        kmsMachine="azkms.core.windows.net",
        kmsPort=1688,
    )
    doc["steps"] = [
        {"name": name, "hresult": "0x00000000"}
        for name in ("install-key", "clear-kms-cache", "set-kms-host", "set-kms-port", "refresh", "activate")
    ]
    return doc


def line(doc: object) -> str:
    return RESULT_MARKER + json.dumps(doc, separators=(",", ":"))


def parse_detect(text: str) -> GuestResult:
    return parse_result(text, expected_script="detect")


# --- valid output ---------------------------------------------------------------------------------


def test_valid_detect_line() -> None:
    result = parse_detect(line(detect_doc()))
    assert result.script == "detect"
    assert result.os is not None
    assert (result.os.build, result.os.product_type, result.os.sku) == (20348, 3, 8)
    assert result.os.edition_id == "ServerDatacenter"
    assert result.license is not None
    assert result.license.channel is Channel.AVMA
    assert result.license.license_status is LicenseStatus.NOTIFICATION
    assert result.license.product_key_channel is None
    assert result.license.partial_product_key == "DV9BG"
    assert result.kms_probe is not None
    assert result.kms_probe.reachable is True
    assert result.steps == ()
    assert result.error is None


def test_valid_remediate_line() -> None:
    result = parse_result(line(remediate_doc()), expected_script="remediate")
    assert next(step.name for step in result.steps) == "install-key"
    assert all(step.ok for step in result.steps)
    assert result.license is not None
    assert result.license.channel is Channel.KMS_CLIENT
    assert result.license.license_status is LicenseStatus.LICENSED
    assert result.license.kms_machine == "azkms.core.windows.net"


def test_remediation_that_stopped_at_a_failed_step() -> None:
    doc = remediate_doc()
    doc["steps"] = [
        {"name": "clear-kms-cache", "hresult": "0x00000000"},
        {"name": "set-kms-host", "hresult": "0x00000000"},
        {"name": "set-kms-port", "hresult": "0x00000000"},
        {"name": "refresh", "hresult": "0x00000000"},
        {"name": "activate", "hresult": "0xC004F074"},
    ]
    result = parse_result(line(doc), expected_script="remediate")
    assert [s.ok for s in result.steps] == [True, True, True, True, False]
    assert result.steps[-1].hresult == "0xC004F074"


def test_license_may_be_null_and_error_allows_missing_facts() -> None:
    doc = detect_doc()
    doc["license"] = None
    assert parse_detect(line(doc)).license is None

    doc = detect_doc()
    doc.update(os=None, license=None, kmsProbe=None)
    doc["error"] = {"step": "parameters", "hresult": "0x80070057", "message": "KmsHost is not a host name"}
    result = parse_detect(line(doc))
    assert result.error is not None
    assert result.error.hresult == "0x80070057"
    assert result.os is None
    assert result.kms_probe is None


def test_contract_example_is_accepted() -> None:
    block = re.search(r"```jsonc\n(.*?)```", CONTRACT.read_text(encoding="utf-8"), re.DOTALL)
    assert block
    without_comments = re.sub(r"\s//[^\n]*", "", block.group(1))
    result = parse_detect(RESULT_MARKER + json.dumps(json.loads(without_comments)))
    assert result.license is not None
    assert result.license.channel is Channel.AVMA


def test_crlf_line_endings() -> None:
    output = "\r\n".join(["Reading facts", line(detect_doc()), ""])
    assert parse_detect(output).os is not None


def test_surrounding_noise_and_the_last_marker_line_wins() -> None:
    first = detect_doc()
    first["os"]["build"] = 17763
    output = "\n".join(
        [
            "Probing azkms.core.windows.net:1688",
            line(first),
            "some text " + RESULT_MARKER + "{not at line start}",
            "  " + line(detect_doc()) + "  (indented: not a result line)",
            line(detect_doc()),
            "trailing noise after the line",
            "",
        ]
    )
    result = parse_detect(output)
    assert result.os is not None
    assert result.os.build == 20348


def test_output_cut_to_the_last_4096_bytes_still_parses() -> None:
    noise = [f"Step {i}: a long line of progress text that Run Command will drop" for i in range(400)]
    output = "\r\n".join([*noise, line(remediate_doc())]) + "\r\n"
    cut = output.encode("utf-8")[-4096:].decode("utf-8", errors="ignore")
    assert not cut.startswith("Step 0")
    assert len(parse_result(cut, expected_script="remediate").steps) == 6


def test_output_cut_through_the_marker_line_fails_clearly() -> None:
    doc = detect_doc()
    doc["os"]["caption"] = "x" * 5000  # a line longer than what Run Command keeps
    output = "noise\n" + line(doc) + "\n"
    cut = output.encode("utf-8")[-4096:].decode("utf-8", errors="ignore")
    with pytest.raises(GuestOutputError, match="4,096"):
        parse_detect(cut)


def test_cut_inside_the_marker_itself_fails() -> None:
    text = line(detect_doc())
    with pytest.raises(GuestOutputError, match="no line starting with"):
        parse_detect(text[5:])


@pytest.mark.parametrize("output", ["", "\n\n", "Activating Windows...\nDone.", "AVMA-REMEDIATOR-RESULT"])
def test_no_marker_line(output: str) -> None:
    with pytest.raises(GuestOutputError, match="no line starting with"):
        parse_detect(output)


@pytest.mark.parametrize(
    "payload",
    [
        "{",
        '{"schema":2,"script":"detect"',
        "not json",
        "",
        "[1,2,3",
        '{"schema":2}}',
        '{"schema":NaN}',
        '{"schema":Infinity}',
        "[" * 5000 + "]" * 5000,
    ],
)
def test_garbled_json(payload: str) -> None:
    with pytest.raises(GuestOutputError):
        parse_detect(RESULT_MARKER + payload)


def test_duplicate_keys_are_rejected() -> None:
    text = line(detect_doc()).replace('"schema":2,', '"schema":2,"schema":2,', 1)
    with pytest.raises(GuestOutputError, match="duplicate"):
        parse_detect(text)


@pytest.mark.parametrize("schema", [0, 1, 3, "2", 2.0, True, None])
def test_wrong_schema(schema: object) -> None:
    doc = detect_doc()
    doc["schema"] = schema
    with pytest.raises(GuestOutputError, match="schema"):
        parse_detect(line(doc))


def test_wrong_script() -> None:
    with pytest.raises(GuestOutputError, match="remediate"):
        parse_result(line(detect_doc()), expected_script="remediate")
    with pytest.raises(GuestOutputError, match="detect"):
        parse_detect(line(remediate_doc()))


def test_unknown_expected_script_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="expected_script"):
        parse_result(line(detect_doc()), expected_script="other")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("os", "build"), "20348"),
        (("os", "build"), 20348.0),
        (("os", "build"), True),  # bool is not int
        (("os", "build"), -1),
        (("os", "sku"), None),
        (("os", "productType"), False),
        (("os", "caption"), None),
        (("os", "editionId"), 8),
        (("license", "licenseStatus"), 7),
        (("license", "licenseStatus"), -1),
        (("license", "licenseStatus"), True),
        (("license", "licenseStatus"), "5"),
        (("license", "graceMinutes"), 1.5),
        (("license", "kmsPort"), 70000),
        (("license", "description"), None),
        (("license", "kmsMachine"), 0),
        (("license", "productKeyChannel"), False),
        (("kmsProbe", "reachable"), 1),
        (("kmsProbe", "reachable"), "true"),
        (("kmsProbe", "port"), "1688"),
        (("kmsProbe", "error"), ["timeout"]),
        (("os",), []),
        (("license",), "none"),
        (("kmsProbe",), 0),
    ],
)
def test_wrong_types(path: tuple[str, ...], value: object) -> None:
    doc = detect_doc()
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(GuestOutputError, match=path[-1]):
        parse_detect(line(doc))


def _all_paths(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for key, value in doc.items():
        paths.append((key,))
        if isinstance(value, dict):
            paths.extend((key, inner) for inner in value)
    return paths


@pytest.mark.parametrize("path", _all_paths(detect_doc()), ids="/".join)
def test_missing_fields(path: tuple[str, ...]) -> None:
    doc = copy.deepcopy(detect_doc())
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    with pytest.raises(GuestOutputError, match=f"missing field.*{path[-1]}"):
        parse_detect(line(doc))


def test_unexpected_fields_are_rejected() -> None:
    doc = detect_doc()
    doc["os"]["installationType"] = "Server Core"
    with pytest.raises(GuestOutputError, match="unexpected field"):
        parse_detect(line(doc))
    doc = detect_doc()
    doc["extra"] = 1
    with pytest.raises(GuestOutputError, match="unexpected field"):
        parse_detect(line(doc))


@pytest.mark.parametrize("document", [[], "text", 1, None, True])
def test_result_that_is_not_an_object(document: object) -> None:
    with pytest.raises(GuestOutputError, match="expected an object"):
        parse_detect(line(document))


def test_os_and_probe_are_required_without_an_error() -> None:
    for field in ("os", "kmsProbe"):
        doc = detect_doc()
        doc[field] = None
        with pytest.raises(GuestOutputError, match="only be null when error is set"):
            parse_detect(line(doc))


@pytest.mark.parametrize(
    "error",
    [
        {"step": "read-os", "hresult": "0x8004101", "message": "x"},
        {"step": "read-os", "hresult": "0x8004101e", "message": "x"},  # lower case
        {"step": "read-os", "hresult": "80041010", "message": "x"},
        {"step": "read-os", "hresult": -2147217392, "message": "x"},
        {"step": "read-os", "hresult": "0x80041010"},
        {"step": None, "hresult": "0x80041010", "message": "x"},
        "0x80041010",
    ],
)
def test_bad_error_object(error: object) -> None:
    doc = detect_doc()
    doc["error"] = error
    with pytest.raises(GuestOutputError, match="error"):
        parse_detect(line(doc))


@pytest.mark.parametrize(
    "steps",
    [
        {"name": "activate"},
        [{"name": "activate", "hresult": "0x0"}],
        [{"name": "activate", "hresult": "0xc004f074"}],
        [{"name": "format-disk", "hresult": "0x00000000"}],
        [{"name": "activate", "hresult": "0x00000000"}, {"name": "refresh", "hresult": "0x00000000"}],
        [{"name": "refresh", "hresult": "0x00000000"}, {"name": "refresh", "hresult": "0x00000000"}],
        [{"name": "refresh", "hresult": "0xC004F074"}, {"name": "activate", "hresult": "0x00000000"}],
        [{"name": "refresh"}],
        ["refresh"],
    ],
)
def test_bad_steps(steps: object) -> None:
    doc = remediate_doc()
    doc["steps"] = steps
    with pytest.raises(GuestOutputError, match="steps"):
        parse_result(line(doc), expected_script="remediate")


def test_detect_reports_no_steps() -> None:
    doc = detect_doc()
    doc["steps"] = [{"name": "refresh", "hresult": "0x00000000"}]
    with pytest.raises(GuestOutputError, match="steps"):
        parse_detect(line(doc))


@pytest.mark.parametrize(
    ("escaped", "expected"),
    [
        ("abc\\ud83d", "abc\ufffd"),  # a text cut after the first half of a pair
        ("\\ude00abc", "\ufffdabc"),  # a lone second half
        ("\\ud83d\\ude00", "\U0001f600"),  # a whole pair stays one character
    ],
)
def test_half_a_surrogate_pair_becomes_a_replacement_character(escaped: str, expected: str) -> None:
    text = line(detect_doc()).replace('"Microsoft Windows Server 2022 Datacenter"', f'"{escaped}"')
    result = parse_detect(text)
    assert result.os is not None
    assert result.os.caption == expected
    result.os.caption.encode("utf-8")  # printable and loggable


def azure_edition_doc(attestation: object) -> dict[str, Any]:
    doc = detect_doc()
    doc["os"].update(editionId="ServerTurbine", sku=407)
    doc["attestation"] = attestation
    return doc


@pytest.mark.parametrize(
    ("attestation", "expected"),
    [
        ({"imdsReachable": True, "chainValid": True, "error": None}, (True, True, None)),
        (
            {"imdsReachable": True, "chainValid": False, "error": "PartialChain"},
            (True, False, "PartialChain"),
        ),
        ({"imdsReachable": False, "chainValid": None, "error": "timed out"}, (False, None, "timed out")),
    ],
)
def test_attestation_is_parsed(attestation: dict[str, object], expected: tuple[object, ...]) -> None:
    result = parse_detect(line(azure_edition_doc(attestation)))
    assert result.attestation is not None
    facts = result.attestation
    assert (facts.imds_reachable, facts.chain_valid, facts.error) == expected


@pytest.mark.parametrize(
    ("attestation", "message"),
    [
        ({"imdsReachable": False, "chainValid": True, "error": None}, "null when IMDS was not reached"),
        ({"imdsReachable": False, "chainValid": False, "error": None}, "null when IMDS was not reached"),
        ({"imdsReachable": True, "chainValid": None, "error": None}, "true or false when IMDS was reached"),
        (
            {"imdsReachable": "true", "chainValid": True, "error": None},
            "imdsReachable: expected true or false",
        ),
        ({"imdsReachable": 1, "chainValid": True, "error": None}, "imdsReachable: expected true or false"),
        ({"imdsReachable": True, "chainValid": 1, "error": None}, "chainValid: expected true or false"),
        ({"imdsReachable": True, "chainValid": "false", "error": None}, "chainValid: expected true or false"),
        ({"imdsReachable": True, "chainValid": True, "error": 0}, "error: expected a string"),
        ({"imdsReachable": True, "chainValid": True}, "missing field"),
        ({"imdsReachable": True, "chainValid": True, "error": None, "token": "x"}, "unexpected field"),
        (True, "expected an object"),
        ([], "expected an object"),
    ],
)
def test_hostile_attestation_is_rejected(attestation: object, message: str) -> None:
    with pytest.raises(GuestOutputError, match=message):
        parse_detect(line(azure_edition_doc(attestation)))


FIXED_LINE_ERRORS = [
    {
        "step": "powershell-version",
        "hresult": "0x80070032",
        "message": "Windows PowerShell 2.0 is older than 3.0",
    },
    {
        "step": "write-result",
        "hresult": "0x80004005",
        "message": "the result line could not be built or written",
    },
]


def _fixed_line(script: str, error: dict[str, str]) -> dict[str, Any]:
    doc = detect_doc() if script == "detect" else remediate_doc()
    doc.update(os=None, license=None, kmsProbe=None, attestation=None, steps=[], error=dict(error))
    return doc


@pytest.mark.parametrize("script", ["detect", "remediate"])
@pytest.mark.parametrize("error", FIXED_LINE_ERRORS, ids=lambda e: e["step"])
def test_the_two_plain_string_lines_parse_with_no_facts(script: str, error: dict[str, str]) -> None:
    result = parse_result(line(_fixed_line(script, error)), expected_script=script)
    assert result.error is not None and result.error.step == error["step"]
    assert (result.os, result.license, result.kms_probe, result.attestation, result.steps) == (
        None,
        None,
        None,
        None,
        (),
    )


@pytest.mark.parametrize(
    ("script", "field"),
    [(s, f) for s in ("detect", "remediate") for f in ("os", "license", "kmsProbe", "attestation")]
    + [("remediate", "steps")],  # detect never reports steps (test_detect_reports_no_steps)
)
@pytest.mark.parametrize("error", FIXED_LINE_ERRORS, ids=lambda e: e["step"])
def test_a_plain_string_error_line_with_facts_or_steps_is_rejected(
    script: str, field: str, error: dict[str, str]
) -> None:
    """The guard and the write-result fallback print no facts and no steps (contract v2); a line
    that has them as well contradicts itself, and the engine would tell the operator "nothing was
    changed" (powershell-version) about a VM whose steps ran."""
    doc = _fixed_line(script, error)
    full = remediate_doc()
    doc[field] = (
        {"imdsReachable": True, "chainValid": True, "error": None} if field == "attestation" else full[field]
    )
    with pytest.raises(GuestOutputError, match="no facts and no steps"):
        parse_result(line(doc), expected_script=script)


def test_non_text_output() -> None:
    with pytest.raises(GuestOutputError, match="not text"):
        parse_detect(b"AVMA-REMEDIATOR-RESULT {}")  # type: ignore[arg-type]


# --- any input: a result or GuestOutputError, never another exception -----------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=30,
)


def _mutated(draw_doc: dict[str, Any], key: str, value: object) -> dict[str, Any]:
    doc = copy.deepcopy(draw_doc)
    doc[key] = value
    return doc


@given(st.text())
def test_any_text_gives_a_result_or_guest_output_error(text: str) -> None:
    for script in ("detect", "remediate"):
        for output in (text, RESULT_MARKER + text, "noise\r\n" + RESULT_MARKER + text + "\r\n"):
            try:
                result = parse_result(output, expected_script=script)
            except GuestOutputError:
                continue
            assert isinstance(result, GuestResult)


@settings(max_examples=300)
@given(
    key=st.sampled_from(["schema", "script", "os", "license", "kmsProbe", "attestation", "steps", "error"]),
    value=JSON_VALUES,
    script=st.sampled_from(["detect", "remediate"]),
)
def test_any_json_value_in_any_field_gives_a_result_or_guest_output_error(
    key: str, value: object, script: str
) -> None:
    base = detect_doc() if script == "detect" else remediate_doc()
    try:
        result = parse_result(line(_mutated(base, key, value)), expected_script=script)
    except GuestOutputError:
        return
    assert isinstance(result, GuestResult)


@given(JSON_VALUES)
def test_any_json_document_gives_a_result_or_guest_output_error(document: object) -> None:
    try:
        parse_detect(line(document))
    except GuestOutputError:
        return
    raise AssertionError("a random document is never a valid result")
