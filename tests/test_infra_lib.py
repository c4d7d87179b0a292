"""What the infra tests share: every Bicep file under infra/ parsed once with pycep-parser, and a
checker of resource bodies against the ARM JSON schemas in tests/data/arm-schemas.

There is no Bicep compiler here, so the checker does the part of its job that catches real
mistakes: a resource type or apiVersion that does not exist, a property name that is misspelt or in
the wrong place (nested objects included), a literal that is not one of the allowed values, a
literal of the wrong JSON type, a required property left out. Expressions (references, function
calls, interpolated strings) are not evaluated; pycep's expression trees are not reliable enough for
that (tooling notes, section 7).

The tests at the bottom prove the checker itself can fail.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
SCHEMAS = Path(__file__).resolve().parent / "data" / "arm-schemas"
EXPRESSION_REF = "common/definitions.json#/definitions/expression"
# Keys of a Bicep resource body that are Bicep's, not part of the ARM resource body.
BICEP_KEYWORDS = frozenset({"scope", "parent", "dependsOn"})
SCOPE_SECTIONS = {
    "resourceGroup": ("resourceDefinitions", "extension_resourceDefinitions"),
    "subscription": (
        "subscription_resourceDefinitions",
        "extension_resourceDefinitions",
        "resourceDefinitions",
    ),
    "managementGroup": (
        "managementGroup_resourceDefinitions",
        "extension_resourceDefinitions",
        "resourceDefinitions",
    ),
}


# --- parsing ---------------------------------------------------------------------------------------


def bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


def rel(path: Path) -> str:
    return path.relative_to(INFRA).as_posix()


@functools.cache
def _parser() -> BicepParser:
    return BicepParser()


@functools.cache
def template(name: str) -> dict[str, Any]:
    """The pycep JSON of infra/<name> (e.g. ``"main.bicep"``, ``"app/api.bicep"``)."""
    return dict(_parser().parse(file_path=INFRA / name))


def templates() -> dict[str, dict[str, Any]]:
    return {rel(path): template(rel(path)) for path in bicep_files()}


def target_scope(tpl: dict[str, Any]) -> str:
    scope = tpl.get("globals", {}).get("scope", {}).get("value")
    return str(scope) if scope else "resourceGroup"


def is_expression(value: Any) -> bool:
    """pycep writes function calls and operators as ``{"function": {...}}`` / ``{"operator": {...}}``."""
    return (
        isinstance(value, dict)
        and len(value) == 1
        and next(iter(value)) in ("function", "operator")
        and isinstance(next(iter(value.values())), dict)
    )


def unwrap(config: Any) -> Any:
    """A resource or module body without its ``[for ...]`` / ``if (...)`` wrapper."""
    while (
        isinstance(config, dict)
        and "config" in config
        and set(config) <= {"config", "condition", "loop_type"}
        and ("condition" in config or "loop_type" in config)
    ):
        config = config["config"]
    return config


def unquote(key: str) -> str:
    """pycep keeps the quotes of a quoted object key (``'azd-env-name'``)."""
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == "'" else key


def unescape(text: str) -> str:
    """pycep keeps Bicep's escapes in single-quoted strings."""
    return text.replace("\\'", "'").replace("\\\\", "\\")


@dataclass(frozen=True)
class Resource:
    file: str
    symbol: str
    type: str
    api_version: str
    existing: bool
    body: dict[str, Any]
    wrapper: dict[str, Any]  # the loop/condition wrapper ({} when none)


def resources(name: str | None = None) -> Iterator[Resource]:
    """Every resource declaration of one file, or of every file."""
    names = [name] if name else [rel(p) for p in bicep_files()]
    for file in names:
        for symbol, res in template(file).get("resources", {}).items():
            config = res["config"]
            body = unwrap(config)
            wrapper = config if body is not config else {}
            yield Resource(
                file, symbol, res["type"], res["api_version"], bool(res["existing"]), body, wrapper
            )


def modules(name: str) -> dict[str, dict[str, Any]]:
    return dict(template(name).get("modules", {}))


def walk(value: Any) -> Iterator[Any]:
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)


def identifiers(tpl: dict[str, Any]) -> set[str]:
    """Every name a bare identifier in the file can refer to (pycep prints ``x`` and ``'x'`` alike)."""
    names: set[str] = set()
    for section in ("parameters", "variables", "resources", "modules"):
        names.update(tpl.get(section, {}))
    for node in walk(tpl):
        if isinstance(node, dict) and isinstance(node.get("loop_type"), dict):
            detail = node["loop_type"].get("detail") or {}
            names.update(str(v) for k, v in detail.items() if k in ("item_name", "index_name") and v)
    return names


def decorators(param: dict[str, Any]) -> dict[str, Any]:
    return {d["type"]: d.get("argument") for d in param.get("decorators", [])}


def function_calls(value: Any, kind: str) -> list[dict[str, Any]]:
    """Every ``{"function": {"type": kind, ...}}`` inside a value."""
    return [
        node["function"]
        for node in walk(value)
        if isinstance(node, dict)
        and isinstance(node.get("function"), dict)
        and node["function"].get("type") == kind
    ]


def render(value: Any) -> str:
    """A compact text of a pycep value, for comparing expressions: ``storage.id``,
    ``guid(storage.id, principalId, role)``, ``subscription().id``."""
    if isinstance(value, dict) and isinstance(value.get("operator"), dict):
        operator = value["operator"]
        operands = operator.get("operands") or {}
        if operator.get("type") == "property_accessor":
            return f"{render(operands.get('operand_1'))}.{render(operands.get('operand_2'))}"
        return f"{operator.get('type')}({', '.join(render(v) for v in operands.values())})"
    if is_expression(value):
        function = value["function"]
        params = function.get("parameters") or {}
        return f"{function.get('type')}({', '.join(render(v) for v in params.values() if v is not None)})"
    if isinstance(value, list):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{unquote(str(k))}: {render(v)}" for k, v in value.items()) + "}"
    return str(value)


def guid_args(value: Any) -> list[str] | None:
    """The rendered arguments of a ``guid(...)`` name, or None when the name is not a guid() call."""
    if not (is_expression(value) and value["function"].get("type") == "guid"):
        return None
    return [render(v) for v in (value["function"].get("parameters") or {}).values() if v is not None]


# --- the ARM JSON schemas ----------------------------------------------------------------------------


class ArmSchemas:
    """The schema files of tests/data/arm-schemas, indexed by (resource type, apiVersion)."""

    def __init__(self, root: Path = SCHEMAS) -> None:
        self.files: dict[str, dict[str, Any]] = {
            path.relative_to(root).as_posix(): json.loads(path.read_text())
            for path in sorted(root.rglob("*.json"))
        }
        self.index: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
        for file, doc in self.files.items():
            if file.startswith("common/"):
                continue
            api_version = file.split("/")[0]
            for section, definitions in doc.items():
                if not section.endswith("resourceDefinitions"):
                    continue
                for name, definition in definitions.items():
                    full_type = _declared_type(definition)
                    self.index.setdefault((full_type.lower(), api_version), []).append((file, section, name))

    def resource(self, rtype: str, api_version: str, scope: str) -> tuple[dict[str, Any], str] | None:
        """The resource definition for a type at an apiVersion, preferring the deployment scope's section."""
        candidates = self.index.get((rtype.lower(), api_version), [])
        for section in (*SCOPE_SECTIONS.get(scope, ()), None):
            for file, found_section, name in candidates:
                if section is None or found_section == section:
                    return self.files[file][found_section][name], file
        return None

    def files_used_by(self, keys: set[tuple[str, str]]) -> set[str]:
        return {file for key in keys for file, _, _ in self.index.get((key[0].lower(), key[1]), [])}

    # -- resolution

    def _deref(self, node: dict[str, Any], file: str) -> tuple[dict[str, Any], str]:
        seen = 0
        while "$ref" in node:
            seen += 1
            if seen > 50:
                raise ValueError(f"$ref loop at {node['$ref']}")
            ref = str(node["$ref"])
            location, _, fragment = ref.partition("#")
            if location:
                file = location.split("/schemas/", 1)[1]
            target: Any = self.files[file]
            for part in fragment.strip("/").split("/"):
                target = target[part]
            node = target
        return node, file

    def _is_expression(self, node: dict[str, Any]) -> bool:
        return str(node.get("$ref", "")).endswith(EXPRESSION_REF)

    def variants(self, node: dict[str, Any], file: str) -> list[tuple[dict[str, Any], str]]:
        """The concrete alternatives of a schema node: $refs followed, oneOf/anyOf/allOf expanded, the
        "any ARM expression" alternative dropped (a Bicep literal is never an ARM expression)."""
        if self._is_expression(node):
            return []
        node, file = self._deref(node, file)
        if "allOf" in node:
            merged = {k: v for k, v in node.items() if k != "allOf"}
            for part in node["allOf"]:
                for sub, _ in self.variants(part, file):
                    merged = _merge(merged, sub)
            node = merged
        alternatives = node.get("oneOf") or node.get("anyOf")
        if not alternatives:
            return [(node, file)]
        base = {k: v for k, v in node.items() if k not in ("oneOf", "anyOf")}
        out: list[tuple[dict[str, Any], str]] = []
        for alternative in alternatives:
            for sub, sub_file in self.variants(alternative, file):
                out.append((_merge(base, sub), sub_file))
        return out

    # -- checking

    def check(self, value: Any, node: dict[str, Any], file: str, path: str, idents: set[str]) -> list[str]:
        """Problems with a Bicep value against a schema node (empty when it fits)."""
        if value is None or is_expression(value):
            return []
        if isinstance(value, str) and (value in idents or "${" in value):
            return []  # a reference or an interpolation: its value is not known here
        alternatives = self.variants(node, file)
        if not alternatives:
            return []  # only "any expression" is declared: nothing to compare with
        best: list[str] | None = None
        for schema, schema_file in alternatives:
            problems = self._check_one(value, schema, schema_file, path, idents)
            if not problems:
                return []
            if best is None or len(problems) < len(best):
                best = problems
        return best or []

    def _check_one(
        self, value: Any, schema: dict[str, Any], file: str, path: str, idents: set[str]
    ) -> list[str]:
        kind = schema.get("type")
        if isinstance(value, bool):
            return [] if kind in (None, "boolean") else [f"{path}: a boolean where the schema wants {kind}"]
        if isinstance(value, int | float):
            return (
                []
                if kind in (None, "integer", "number")
                else [f"{path}: a number where the schema wants {kind}"]
            )
        if isinstance(value, str):
            if kind not in (None, "string"):
                return [f"{path}: the string {value!r} where the schema wants {kind}"]
            allowed = schema.get("enum")
            if allowed and unescape(value).lower() not in {str(a).lower() for a in allowed}:
                return [f"{path}: {value!r} is not one of {allowed}"]
            return []
        if isinstance(value, list):
            if kind not in (None, "array"):
                return [f"{path}: an array where the schema wants {kind}"]
            items = schema.get("items")
            if not isinstance(items, dict):
                return []
            problems: list[str] = []
            for i, item in enumerate(value):
                problems += self.check(item, items, file, f"{path}[{i}]", idents)
            return problems
        if isinstance(value, dict):
            if kind not in (None, "object"):
                return [f"{path}: an object where the schema wants {kind}"]
            return self.check_object(value, schema, file, path, idents)
        return [f"{path}: unexpected value {value!r}"]

    def check_object(
        self,
        value: dict[str, Any],
        schema: dict[str, Any],
        file: str,
        path: str,
        idents: set[str],
        *,
        not_required: frozenset[str] = frozenset(),
    ) -> list[str]:
        props: dict[str, Any] = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        closed = extra is False or (bool(props) and extra is None)
        problems: list[str] = []
        keys = set()
        for raw_key, item in value.items():
            key = unquote(str(raw_key))
            keys.add(key)
            if "${" in key:
                if isinstance(extra, dict):
                    problems += self.check(item, extra, file, f"{path}[{key}]", idents)
                continue
            if key in props:
                problems += self.check(item, props[key], file, f"{path}.{key}", idents)
            elif isinstance(extra, dict):
                problems += self.check(item, extra, file, f"{path}.{key}", idents)
            elif closed:
                problems.append(f"{path}.{key}: no such property here (the schema has {sorted(props)})")
        for required in schema.get("required", []):
            if required not in keys and required not in not_required:
                problems.append(f"{path}: required property {required!r} is missing")
        return problems


def _declared_type(definition: dict[str, Any]) -> str:
    declared = definition.get("properties", {}).get("type", {}).get("enum")
    return str(declared[0]) if declared else str(definition.get("description", ""))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **extra}
    if "properties" in base or "properties" in extra:
        merged["properties"] = {**base.get("properties", {}), **extra.get("properties", {})}
    if "required" in base or "required" in extra:
        merged["required"] = [*base.get("required", []), *extra.get("required", [])]
    return merged


@functools.cache
def arm_schemas() -> ArmSchemas:
    return ArmSchemas()


def check_resource(resource: Resource, schemas: ArmSchemas | None = None) -> list[str]:
    """Every problem of one resource declaration against its schema."""
    schemas = schemas or arm_schemas()
    tpl = template(resource.file)
    found = schemas.resource(resource.type, resource.api_version, target_scope(tpl))
    where = f"{resource.file}: {resource.symbol} ({resource.type}@{resource.api_version})"
    if found is None:
        return [f"{where}: no schema for this type and apiVersion in tests/data/arm-schemas"]
    definition, file = found
    body = {k: v for k, v in resource.body.items() if k not in BICEP_KEYWORDS}
    if resource.existing:
        body = {"name": body.get("name")}
    idents = identifiers(tpl)
    problems: list[str] = []
    for schema, schema_file in schemas.variants(definition, file):
        problems = schemas.check_object(
            body,
            schema,
            schema_file,
            where,
            idents,
            not_required=frozenset(
                {"type", "apiVersion", "properties"} if resource.existing else {"type", "apiVersion"}
            ),
        )
        if not problems:
            return []
    return problems


# --- the checker can fail ----------------------------------------------------------------------------


def _resource(file: str, symbol: str) -> Resource:
    return next(r for r in resources(file) if r.symbol == symbol)


def _mutated(
    resource: Resource, path: list[str], key: str, value: Any, *, drop: str | None = None
) -> Resource:
    body = copy.deepcopy(resource.body)
    target = body
    for step in path:
        target = target[step]
    if drop is not None:
        del target[drop]
    else:
        target[key] = value
    return Resource(resource.file, resource.symbol, resource.type, resource.api_version, False, body, {})


def test_every_bicep_file_parses_with_pycep() -> None:
    parsed = templates()
    assert {"main.bicep", "post/wiring.bicep", "management-group.bicep"} <= set(parsed)
    assert all("resources" in tpl or "modules" in tpl for tpl in parsed.values())


def test_the_real_bodies_pass_so_the_failures_below_are_the_mutations() -> None:
    for file, symbol in (
        ("app/storage.bicep", "storage"),
        ("app/api.bicep", "functionApp"),
        ("post/event-subscription.bicep", "vmWrites"),
    ):
        assert check_resource(_resource(file, symbol)) == []


@pytest.mark.parametrize(
    ("file", "symbol", "path", "key", "value", "expected"),
    [
        # a misspelt property at the top of the body, and deep inside nested objects
        ("app/storage.bicep", "storage", ["properties"], "allowSharedKeyAcess", False, "allowSharedKeyAcess"),
        (
            "app/api.bicep",
            "functionApp",
            ["properties", "functionAppConfig", "runtime"],
            "verison",
            "3.11",
            "verison",
        ),
        (
            "post/event-subscription.bicep",
            "vmWrites",
            ["properties", "destination", "properties"],
            "maxEventPerBatch",
            1,
            "maxEventPerBatch",
        ),
        (
            "post/event-subscription.bicep",
            "vmWrites",
            ["properties", "retryPolicy"],
            "maxDeliveryAttempt",
            3,
            "maxDeliveryAttempt",
        ),
        # a literal that is not an allowed value
        (
            "app/api.bicep",
            "functionApp",
            ["properties", "functionAppConfig", "deployment", "storage", "authentication"],
            "type",
            "UserAssignedIdentiy",
            "UserAssignedIdentiy",
        ),
        ("app/monitoring.bicep", "dataCollectionRule", [], "kind", "Windowz", "Windowz"),
        # a literal of the wrong JSON type
        (
            "app/storage.bicep",
            "storage",
            ["properties"],
            "allowSharedKeyAccess",
            "false",
            "allowSharedKeyAccess",
        ),
        # a property that exists, but somewhere else
        ("app/storage.bicep", "storage", [], "minimumTlsVersion", "TLS1_2", "minimumTlsVersion"),
    ],
)
def test_a_wrong_property_or_value_is_caught(
    file: str, symbol: str, path: list[str], key: str, value: Any, expected: str
) -> None:
    problems = check_resource(_mutated(_resource(file, symbol), path, key, value))
    assert problems, "the checker accepted a body a compiler would reject"
    assert any(expected in p for p in problems), problems


def test_a_missing_required_property_is_caught() -> None:
    group = _resource("post/wiring.bicep", "remediatorActionGroup")
    problems = check_resource(_mutated(group, ["properties"], "", None, drop="groupShortName"))
    assert any("groupShortName" in p and "required" in p for p in problems), problems


def test_an_unknown_api_version_is_caught() -> None:
    storage = _resource("app/storage.bicep", "storage")
    wrong = Resource(storage.file, storage.symbol, storage.type, "2099-01-01", False, storage.body, {})
    assert any("no schema" in p for p in check_resource(wrong))
