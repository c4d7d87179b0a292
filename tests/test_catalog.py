"""The KMS client setup key catalog: keys as Microsoft publishes them, and a selection that never guesses."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from shared import catalog
from shared.catalog import CATALOG, SOURCE, CatalogEntry, select_key
from shared.guest.facts import OsFacts

TABLE_FILE = Path(__file__).parent / "data" / "kms-client-setup-keys.md"
OFFICIAL_URL = "https://learn.microsoft.com/windows-server/get-started/kms-client-activation-keys"


def official_table() -> dict[str, str]:
    """Edition -> key, from the verbatim copy of the official table."""
    rows: dict[str, str] = {}
    for line in TABLE_FILE.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"\| (.+?) \| ([A-Z0-9]{5}(?:-[A-Z0-9]{5}){4}) \|", line)
        if match:
            assert match.group(1) not in rows, f"edition listed twice: {match.group(1)}"
            rows[match.group(1)] = match.group(2)
    return rows


TABLE = official_table()


def facts(
    build: int, edition_id: str, sku: int, product_type: int = 3, version: str | None = None
) -> OsFacts:
    if version is None:
        version = {7601: "6.1", 9200: "6.2", 9600: "6.3"}.get(build, "10.0") + f".{build}"
    return OsFacts("Microsoft Windows (caption is not used)", version, build, product_type, sku, edition_id)


def test_table_copy_is_the_official_one() -> None:
    text = TABLE_FILE.read_text(encoding="utf-8")
    assert OFFICIAL_URL in text
    assert "ms.date 10/01/2024" in text
    assert len(TABLE) == 27
    assert TABLE["Windows Server 2022 Datacenter"] == "WX4NM-KYWYW-QJJR4-XV3QB-6VM33"


@pytest.mark.parametrize("entry", CATALOG, ids=lambda e: e.edition)
def test_every_entry_matches_the_official_table(entry: CatalogEntry) -> None:
    assert entry.edition in TABLE, f"{entry.edition!r} is not a row of the official table"
    assert entry.product_key == TABLE[entry.edition]
    assert entry.source == SOURCE
    assert OFFICIAL_URL in entry.source
    assert "10/01/2024" in entry.source
    assert entry.product_type in ("server", "workstation")
    assert entry.edition_ids
    assert entry.skus
    assert len(entry.builds) > 0


def test_catalog_covers_every_server_row_and_the_enterprise_rows() -> None:
    covered = {entry.edition for entry in CATALOG}
    servers = {edition for edition in TABLE if edition.startswith("Windows Server")}
    assert servers <= covered
    assert {
        "Windows 11 / Windows 10 Enterprise",
        "Windows 11 / Windows 10 Enterprise N",
        "Windows 11 Enterprise LTSC 2024 / Windows 10 Enterprise LTSC 2021, 2019",
        "Windows 10 Enterprise LTSB 2016",
    } <= covered
    assert len(covered) == len(CATALOG), "one entry per row"


def test_no_two_entries_can_match_the_same_facts() -> None:
    for left, right in itertools.combinations(CATALOG, 2):
        if left.product_type != right.product_type:
            continue
        shared_builds = set(left.builds) & set(right.builds)
        shared_skus = set(left.skus) & set(right.skus)
        shared_ids = {e.casefold() for e in left.edition_ids} & {e.casefold() for e in right.edition_ids}
        assert not (shared_builds and shared_skus and shared_ids), (left.edition, right.edition)


def _rows_matching(os: OsFacts) -> list[CatalogEntry]:
    """The rows whose every fact agrees with ``os``, computed apart from select_key."""
    kind = {1: "workstation", 2: "server", 3: "server"}.get(os.product_type)
    return [
        entry
        for entry in catalog.CATALOG  # read at call time, so that the tests below can patch it
        if entry.product_type == kind
        and os.build in entry.builds
        and os.sku in entry.skus
        and os.edition_id.lower() in {e.lower() for e in entry.edition_ids}
    ]


def test_every_set_of_facts_the_catalog_knows_matches_at_most_one_row_and_select_key_returns_it() -> None:
    """Exhaustive over every build, SKU and EditionID (three spellings) in the catalog: first-match
    would be safe, and select_key gives exactly the one row or, for none, None."""
    builds = sorted({build for entry in CATALOG for build in entry.builds})
    skus = sorted({sku for entry in CATALOG for sku in entry.skus})
    ids = sorted(
        {spelling for entry in CATALOG for e in entry.edition_ids for spelling in (e, e.lower(), e.upper())}
    )
    seen = 0
    for build, sku, edition_id, product_type in itertools.product(builds, skus, ids, (1, 2, 3)):
        os = facts(build, edition_id, sku, product_type)
        rows = _rows_matching(os)
        assert len(rows) <= 1, (build, sku, edition_id, product_type, [r.edition for r in rows])
        expected = None if edition_id.lower() == "serverrdsh" or sku == 175 else (rows[0] if rows else None)
        assert select_key(os) == expected, (build, sku, edition_id, product_type)
        seen += len(rows)
    assert seen > 100  # the enumeration really reached the rows


def test_select_key_refuses_facts_that_two_rows_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """If a later edit let two rows overlap, select_key must refuse, not take the first."""
    first = next(e for e in CATALOG if e.edition == "Windows Server 2022 Datacenter")
    twin = CatalogEntry(
        "a row that overlaps it",
        "AAAAA-BBBBB-CCCCC-DDDDD-EEEEE",
        SOURCE,
        ("ServerDatacenter",),
        (8,),
        (20348,),
        "server",
    )
    monkeypatch.setattr(catalog, "CATALOG", (first, twin))
    assert select_key(facts(20348, "ServerDatacenter", 8)) is None
    monkeypatch.setattr(catalog, "CATALOG", (first,))
    assert select_key(facts(20348, "ServerDatacenter", 8)) == first


@pytest.mark.parametrize(
    ("edition_id", "sku"), [("ServerRdsh", 175), ("ServerRdsh", 4), ("Enterprise", 175), ("SERVERRDSH", 4)]
)
def test_select_key_alone_refuses_multi_session_even_if_a_row_matched(
    monkeypatch: pytest.MonkeyPatch, edition_id: str, sku: int
) -> None:
    """decide checks multi-session first, but select_key must not depend on it: with a (wrong) row that
    matches a multi-session VM, it still gives None."""
    wrong = CatalogEntry(
        "a row that would match multi-session",
        "AAAAA-BBBBB-CCCCC-DDDDD-EEEEE",
        SOURCE,
        ("ServerRdsh", "Enterprise"),
        (4, 175),
        (22631,),
        "workstation",
    )
    monkeypatch.setattr(catalog, "CATALOG", (*CATALOG, wrong))
    assert _rows_matching(facts(22631, edition_id, sku, product_type=1)) != []
    assert select_key(facts(22631, edition_id, sku, product_type=1)) is None


SERVER_CASES = [
    # (official edition, build, EditionID, OperatingSystemSKU) as Windows reports them
    ("Windows Server 2025 Standard", 26100, "ServerStandard", 7),
    ("Windows Server 2025 Standard", 26100, "ServerStandardCor", 13),
    ("Windows Server 2025 Standard", 26100, "ServerStandardCor", 148),
    ("Windows Server 2025 Datacenter", 26100, "ServerDatacenter", 8),
    ("Windows Server 2025 Datacenter", 26100, "ServerDatacenterCor", 12),
    ("Windows Server 2025 Datacenter", 26100, "ServerDatacenterCor", 147),
    ("Windows Server 2025 Datacenter: Azure Edition", 26100, "ServerTurbine", 407),
    ("Windows Server 2025 Datacenter: Azure Edition", 26100, "ServerTurbineCor", 408),
    ("Windows Server 2025 Datacenter: Azure Edition", 26100, "ServerTurbineCor", 409),
    ("Windows Server 2022 Standard", 20348, "ServerStandard", 7),
    ("Windows Server 2022 Standard", 20348, "ServerStandard", 13),
    ("Windows Server 2022 Datacenter", 20348, "ServerDatacenter", 8),
    ("Windows Server 2022 Datacenter", 20348, "ServerDatacenter", 12),
    ("Windows Server 2022 Datacenter", 20348, "ServerDatacenterCor", 147),
    ("Windows Server 2022 Datacenter: Azure Edition", 20348, "ServerTurbine", 407),
    ("Windows Server 2022 Datacenter: Azure Edition", 20348, "ServerTurbineCor", 408),
    ("Windows Server 2022 Datacenter: Azure Edition", 20348, "ServerTurbineCor", 409),
    ("Windows Server 2019 Standard", 17763, "ServerStandard", 7),
    ("Windows Server 2019 Datacenter", 17763, "ServerDatacenter", 8),
    ("Windows Server 2019 Datacenter", 17763, "ServerDatacenter", 12),
    ("Windows Server 2019 Essentials", 17763, "ServerSolution", 50),
    ("Windows Server 2016 Standard", 14393, "ServerStandard", 7),
    ("Windows Server 2016 Standard", 14393, "ServerStandard", 13),
    ("Windows Server 2016 Datacenter", 14393, "ServerDatacenter", 8),
    ("Windows Server 2016 Essentials", 14393, "ServerSolution", 50),
    ("Windows Server 2012 R2 Standard", 9600, "ServerStandard", 7),
    ("Windows Server 2012 R2 Datacenter", 9600, "ServerDatacenter", 8),
    ("Windows Server 2012 R2 Datacenter", 9600, "ServerDatacenter", 12),
    ("Windows Server 2012 R2 Essentials", 9600, "ServerSolution", 50),
    ("Windows Server 2012 Standard", 9200, "ServerStandard", 7),
    ("Windows Server 2012 Datacenter", 9200, "ServerDatacenter", 8),
    ("Windows Server 2012 Essentials", 9200, "ServerSolution", 50),
    ("Windows Server 2008 R2 Standard", 7601, "ServerStandard", 7),
    ("Windows Server 2008 R2 Standard", 7601, "ServerStandardCore", 13),
    ("Windows Server 2008 R2 Enterprise", 7601, "ServerEnterprise", 10),
    ("Windows Server 2008 R2 Enterprise", 7601, "ServerEnterpriseCore", 14),
    ("Windows Server 2008 R2 Datacenter", 7601, "ServerDatacenter", 8),
    ("Windows Server 2008 R2 Datacenter", 7601, "ServerDatacenterCore", 12),
]


@pytest.mark.parametrize(("edition", "build", "edition_id", "sku"), SERVER_CASES)
@pytest.mark.parametrize("product_type", [3, 2], ids=["server", "domain-controller"])
def test_each_server_edition_is_selected(
    edition: str, build: int, edition_id: str, sku: int, product_type: int
) -> None:
    entry = select_key(facts(build, edition_id, sku, product_type))
    assert entry is not None
    assert entry.edition == edition
    assert entry.product_key == TABLE[edition]


def test_every_server_row_has_a_realistic_case() -> None:
    assert {case[0] for case in SERVER_CASES} == {e for e in TABLE if e.startswith("Windows Server")}


CLIENT_CASES = [
    ("Windows 11 / Windows 10 Enterprise", 22631, "Enterprise", 4),
    ("Windows 11 / Windows 10 Enterprise", 26100, "Enterprise", 4),
    ("Windows 11 / Windows 10 Enterprise", 19045, "Enterprise", 4),
    ("Windows 11 / Windows 10 Enterprise", 17763, "Enterprise", 4),
    ("Windows 11 / Windows 10 Enterprise N", 22621, "EnterpriseN", 27),
    ("Windows 11 / Windows 10 Enterprise N", 19044, "EnterpriseN", 27),
    ("Windows 11 Enterprise LTSC 2024 / Windows 10 Enterprise LTSC 2021, 2019", 26100, "EnterpriseS", 125),
    ("Windows 11 Enterprise LTSC 2024 / Windows 10 Enterprise LTSC 2021, 2019", 19044, "EnterpriseS", 125),
    ("Windows 11 Enterprise LTSC 2024 / Windows 10 Enterprise LTSC 2021, 2019", 17763, "EnterpriseS", 125),
    ("Windows 10 Enterprise LTSB 2016", 14393, "EnterpriseS", 125),
]


@pytest.mark.parametrize(("edition", "build", "edition_id", "sku"), CLIENT_CASES)
def test_each_client_edition_is_selected(edition: str, build: int, edition_id: str, sku: int) -> None:
    entry = select_key(facts(build, edition_id, sku, product_type=1))
    assert entry is not None
    assert entry.edition == edition
    assert entry.product_key == TABLE[edition]


@pytest.mark.parametrize(
    ("build", "edition_id", "sku"),
    [
        (20348, "ServerDatacenter", 7),  # Datacenter EditionID, Standard SKU
        (20348, "ServerStandard", 8),
        (20348, "ServerStandard", 12),
        (20348, "ServerTurbine", 8),  # Azure Edition EditionID, plain Datacenter SKU
        (20348, "ServerDatacenter", 407),
        (17763, "ServerSolution", 7),
        (17763, "ServerStandard", 50),
        (7601, "ServerEnterprise", 8),
        (7601, "ServerDatacenter", 10),
        (9600, "ServerDatacenter", 147),  # a 2016+ Server Core SKU on 2012 R2
        (9600, "ServerDatacenterCor", 8),  # a 2016+ EditionID on 2012 R2
        (22631, "Enterprise", 27),
        (22631, "EnterpriseN", 4),
    ],
)
def test_edition_id_and_sku_that_disagree_give_none(build: int, edition_id: str, sku: int) -> None:
    product_type = 1 if edition_id.startswith("Enterprise") else 3
    assert select_key(facts(build, edition_id, sku, product_type)) is None


@pytest.mark.parametrize(
    ("build", "edition_id", "sku"),
    [
        (7600, "ServerDatacenter", 8),  # 2008 R2 without SP1
        (20349, "ServerDatacenter", 8),  # Azure Stack HCI build, not Windows Server 2022
        (25398, "ServerDatacenter", 8),  # Windows Server 23H2 (annual channel)
        (26200, "ServerDatacenter", 8),
        (17134, "ServerDatacenter", 8),  # semi-annual channel 1803
        (0, "ServerDatacenter", 8),
    ],
)
def test_unknown_server_build_gives_none(build: int, edition_id: str, sku: int) -> None:
    assert select_key(facts(build, edition_id, sku)) is None


@pytest.mark.parametrize(
    ("build", "edition_id", "sku"),
    [
        (27000, "Enterprise", 4),  # Insider build
        (9600, "Enterprise", 4),  # Windows 8.1 Enterprise: not in the catalog
        (19045, "EnterpriseS", 125),  # no LTSC release on 22H2
        (10240, "EnterpriseS", 125),  # LTSB 2015 is not in the table
        (22631, "Professional", 48),  # Pro is deliberately not handled
        (22631, "EnterpriseG", 171),
        (19044, "EnterpriseSN", 126),  # LTSC N: its key is not in the table copy
    ],
)
def test_unknown_client_build_or_edition_gives_none(build: int, edition_id: str, sku: int) -> None:
    assert select_key(facts(build, edition_id, sku, product_type=1)) is None


@pytest.mark.parametrize(
    ("edition_id", "sku", "product_type"),
    [
        ("ServerRdsh", 175, 3),  # Windows 10/11 Enterprise multi-session as Azure reports it
        ("ServerRdsh", 175, 1),
        ("ServerRdsh", 4, 1),  # EditionID alone is enough to refuse
        ("Enterprise", 175, 1),  # SKU alone is enough to refuse
        ("serverrdsh", 175, 3),
    ],
)
@pytest.mark.parametrize("build", [17763, 19044, 22621, 22631, 26100])
def test_multi_session_is_never_selected(edition_id: str, sku: int, product_type: int, build: int) -> None:
    assert select_key(facts(build, edition_id, sku, product_type)) is None


def test_workstation_and_server_are_not_confused() -> None:
    # 14393 and 17763 are both client and server builds: ProductType decides.
    assert select_key(facts(17763, "ServerDatacenter", 8, product_type=1)) is None
    assert select_key(facts(17763, "Enterprise", 4, product_type=3)) is None
    assert select_key(facts(17763, "Enterprise", 4, product_type=2)) is None
    assert select_key(facts(14393, "EnterpriseS", 125, product_type=3)) is None
    server = select_key(facts(17763, "ServerDatacenter", 8, product_type=3))
    client = select_key(facts(17763, "Enterprise", 4, product_type=1))
    assert server is not None
    assert server.product_type == "server"
    assert client is not None
    assert client.product_type == "workstation"


@pytest.mark.parametrize("product_type", [0, 4, -1, 99])
def test_unknown_product_type_gives_none(product_type: int) -> None:
    assert select_key(facts(20348, "ServerDatacenter", 8, product_type)) is None


def test_edition_id_is_compared_without_case() -> None:
    entry = select_key(facts(20348, "serverdatacenter", 8))
    assert entry is not None
    assert entry.edition == "Windows Server 2022 Datacenter"


@pytest.mark.parametrize(
    ("edition_id", "sku"),
    [
        ("ServerDatacenterEval", 80),
        ("ServerStandardEval", 79),
        ("ServerDatacenter", 0),
        ("", 8),
        ("ServerWeb", 17),
    ],
)
def test_editions_outside_the_catalog_give_none(edition_id: str, sku: int) -> None:
    assert select_key(facts(20348, edition_id, sku)) is None
    assert select_key(facts(7601, edition_id, sku)) is None
