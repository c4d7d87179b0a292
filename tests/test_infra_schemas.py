"""Every resource in infra/ against the ARM JSON schemas the tests carry (tests/data/arm-schemas).

A type or apiVersion without a schema, a misspelt or misplaced property, a literal that is not an
allowed value or of the wrong JSON type, a missing required property: each fails here, as it would
fail `bicep build` or the deployment. tests/test_infra_lib.py shows the checker catching each kind.
"""

from __future__ import annotations

import pytest

from tests.test_infra_lib import SCHEMAS, Resource, arm_schemas, check_resource, resources

ALL = list(resources())


@pytest.mark.parametrize("resource", ALL, ids=[f"{r.file}:{r.symbol}" for r in ALL])
def test_resource_body_matches_its_schema(resource: Resource) -> None:
    assert check_resource(resource) == []


def test_every_type_and_api_version_has_a_schema_and_every_schema_is_used() -> None:
    used = {(r.type, r.api_version) for r in ALL}
    missing = sorted(f"{t}@{v}" for t, v in used if not arm_schemas().index.get((t.lower(), v)))
    assert missing == [], "copy these from Azure/azure-resource-manager-schemas (see SOURCE.md)"
    carried = {f for f in arm_schemas().files if not f.startswith("common/")}
    assert carried - arm_schemas().files_used_by(used) == set(), "schema files no resource uses"


def test_the_schemas_keep_their_source_and_licence() -> None:
    source = (SCHEMAS / "SOURCE.md").read_text()
    assert "Azure/azure-resource-manager-schemas" in source
    assert "a1454431151fd3e9c1b254b1a11d00c2d8474611" in source
    assert "MIT" in (SCHEMAS / "LICENSE").read_text()
    assert (SCHEMAS / "common" / "definitions.json").is_file()
