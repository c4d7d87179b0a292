"""Output formats and the progress line (issue 10, item 13): table fits the terminal, --full-ids
pastes into check, tsv as az, csv as RFC 4180, json with its whole shape; done/total and an ETA."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from shared.cli import main
from shared.model import Outcome, OutcomeKind, VmId
from shared.output import COLUMNS, Progress, RunResult, render, result_document
from tests.estates import windows_vm

SUB = "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7"
LONG_RG = "rg-a-resource-group-with-a-name-long-enough-to-matter"


def _id(name: str, rg: str = "rg-app") -> str:
    return f"/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"


def _result() -> RunResult:
    return RunResult(
        "audit",
        [
            Outcome(_id("vm-ok"), OutcomeKind.HEALTHY, "kms-client-licensed", details={"caption": "Windows"}),
            Outcome(
                _id("vm-broken", LONG_RG),
                OutcomeKind.FAILED,
                "detection-error",
                hint='WMI said "no", then\tstopped, on two\nlines',
                details={
                    "caption": "Microsoft Windows Server 2022 Datacenter",
                    "error": "wmi: 0x80041010 invalid class",
                },
            ),
        ],
    )


def test_tsv_is_as_az_no_header_one_line_per_vm_tab_separated() -> None:
    lines = render(_result(), "tsv").split("\n")
    assert len(lines) == 2  # no header; a line break inside a value does not start a row
    first = lines[0].split("\t")
    assert len(first) == len(COLUMNS)
    assert first[:3] == [_id("vm-broken", LONG_RG), "failed", "detection-error"]  # most urgent first
    assert first[4] == 'WMI said "no", then stopped, on two lines'  # no quoting, as az's tsv
    assert lines[1].split("\t")[:3] == [_id("vm-ok"), "healthy", "kms-client-licensed"]


def test_csv_has_a_header_and_quotes_as_rfc_4180() -> None:
    text = render(_result(), "csv")
    assert text.startswith("id,outcome,reason,detail,hint\r\n")  # CRLF line ends (RFC 4180, 2.1)
    assert (
        '"WMI said ""no"", then\tstopped, on two\nlines"' in text
    )  # quotes doubled, field quoted (2.6, 2.7)
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0] == list(COLUMNS)
    assert rows[1][4] == 'WMI said "no", then\tstopped, on two\nlines'  # the value comes back whole
    assert [r[0] for r in rows[1:]] == [_id("vm-broken", LONG_RG), _id("vm-ok")]


def test_the_table_fits_the_width_and_full_ids_are_never_cut() -> None:
    result = _result()
    wide = render(result, "table", width=0)
    assert any(len(line) > 80 for line in wide.splitlines())
    narrow = render(result, "table", width=80)
    assert all(len(line) <= 80 for line in narrow.splitlines()), narrow
    assert "vm-broken" in narrow  # a cut id keeps its end, the name
    full = render(result, "table", full_ids=True, width=80)
    ids = [line.split()[0] for line in full.splitlines()[1:3]]
    assert [VmId.parse(i) for i in ids] == [VmId.parse(_id("vm-broken", LONG_RG)), VmId.parse(_id("vm-ok"))]


def test_the_table_reads_the_terminal_width_from_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    assert all(len(line) <= 60 for line in render(_result(), "table").splitlines())


def test_the_json_result_has_its_whole_shape() -> None:
    doc = json.loads(render(_result(), "json"))
    assert list(doc) == ["summary", "vms", "mode", "listingErrors", "interrupted"]
    assert doc == result_document(_result())
    assert (doc["mode"], doc["listingErrors"], doc["interrupted"]) == ("audit", {}, False)
    assert doc["summary"] == {"failed": 1, "healthy": 1}
    assert list(doc["vms"][0])[:4] == ["id", "outcome", "reason", "hint"]


def test_csv_and_full_ids_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vm = _id("vm-1", LONG_RG)
    estate = tmp_path / "estate.json"
    estate.write_text(json.dumps({"subscriptions": [SUB], "vms": [windows_vm(vm)]}))
    out = tmp_path / "result.json"
    argv = ["sweep", "--simulate", str(estate), "--sim-latency", "0.01", "--out", str(out)]
    assert main([*argv, "--output", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out, newline="")))
    assert rows[0] == list(COLUMNS) and rows[1][:3] == [vm, "would-remediate", "avma-channel"]
    assert json.loads(out.read_text())["vms"][0]["id"] == vm  # --out is JSON whatever --output says
    assert main([*argv, "--full-ids"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[1].split()[0] == vm


class _Stream(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_the_progress_line_shows_done_of_total_and_an_eta() -> None:
    stream = _Stream()
    progress = Progress(stream, total=10, every_s=0)
    progress._started -= 4.0  # four seconds in
    for i in range(4):
        progress.on_outcome(Outcome(_id(f"vm{i}"), OutcomeKind.HEALTHY, "kms-client-licensed"))
    assert progress.line().endswith("4/10 VMs done, ETA 6 s: healthy 4")
    listing = Progress(_Stream(), every_s=0)
    listing.listed(5)
    listing.on_outcome(Outcome(_id("vm0"), OutcomeKind.SKIPPED, "not-windows"))
    assert "1/5+ VMs done, ETA after the listing" in listing.line()
    listing.listed(3)
    listing.listing_done()
    assert "1/8 VMs done, ETA " in listing.line()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == "avma-remediator 0.1.0"


@pytest.mark.parametrize(
    "argv",
    [
        ["intake", "x.json", "--apply"],
        ["intake", "x.json", "--output", "json"],
        ["simulator", "serve", "--apply"],
        ["simulator", "serve", "--output", "json"],
        ["apply", "plan.json", "--apply"],
        ["apply", "plan.json", "--subscription", SUB],
        ["check", _id("vm"), "--out-plan", "plan.json"],
        ["check", _id("vm"), "--from", "result.json"],
    ],
)
def test_an_option_that_means_nothing_for_a_subcommand_is_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "--simulate", "--yes"], "--yes answers the question --apply asks"),
        (["sweep", "--simulate", "--apply", "--out-plan", "p.json"], "--out-plan records an audit"),
        (["sweep", "--simulate", "--only", "failed"], "--only goes with --from"),
    ],
)
def test_options_that_contradict_each_other_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_never_hands_a_spreadsheet_a_formula_from_the_guest(start: str) -> None:
    """The caption is what the guest reported: whoever controls the VM chooses it (OWASP CSV
    Injection); a cell starting as a formula is kept as text with a leading quote."""
    caption = f'{start}HYPERLINK("http://evil.example/","Windows")'
    outcome = Outcome(_id("vm-x"), OutcomeKind.HEALTHY, "kms-client-licensed", details={"caption": caption})
    rows = list(csv.reader(io.StringIO(render(RunResult("audit", [outcome]), "csv"), newline="")))
    assert rows[1][3] == f"'{caption}"
    assert rows[1][:3] == [_id("vm-x"), "healthy", "kms-client-licensed"]  # the rest is as it was
    # tsv stays as az writes it (values raw, a tab or line break made a space): for scripts, not spreadsheets
    assert render(RunResult("audit", [outcome]), "tsv").split("\t")[3].startswith(start.strip() or " ")
