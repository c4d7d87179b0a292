"""An offline subset of the Bicep compiler's checks, read from the compiler's source.

No Bicep compiler runs on this machine (tooling notes §3), and pycep's expression trees cannot be
trusted for meaning (§7), so this module has its own small tokenizer and a declaration-level parser
for the Bicep these templates use, and implements the rules below as the compiler states them.

Source: github.com/Azure/bicep at commit 9beb0fee60ca53458f41492b699af440367b240b (2026-08-21):

- src/Bicep.Core/Diagnostics/DiagnosticBuilder.cs: the BCP codes and their messages.
- src/Bicep.Core/TypeSystem/DeployTimeConstantContainerVisitor.cs: what must be a deploy-time
  constant: resource and module body properties whose type carries the DeployTimeConstant flag
  (bodies of `existing` resources are skipped, only their nested resources are visited), every
  `if` condition, every for-expression's source (and, for a variable's for-expression, its body
  too), arguments of runtime-only functions, and user-defined function bodies.
- src/Bicep.Core/TypeSystem/Providers/Az/AzResourceTypeProvider.cs: ReadWriteDeployTimeConstant-
  PropertyNames (id, name, type, apiVersion: the only resource properties readable at deployment
  start) and WriteOnlyDeployTimeConstantPropertyNames (location, kind, subscriptionId,
  resourceGroup, managedBy, extendedLocation, zones, placement, plan, sku, identity,
  managedByExtended, tags, asserts: must be constants, cannot be read); scope and parent are
  DeployTimeConstant | ReadableAtDeployTime.
- src/Bicep.Core/LanguageConstants.cs (CreateModuleType): a module's name is DeployTimeConstant |
  ReadableAtDeployTime, its scope and identity are DeployTimeConstant; outputs are not readable.
- src/Bicep.Core/TypeSystem/DeployTimeConstantDirectViolationVisitor.cs and
  ...IndirectViolationVisitor.cs: a violation is a property access on a resource or module that is
  not ReadableAtDeployTime, a reference to a whole resource or module (except in scope/parent), a
  call of a function flagged RequiresInlining (AzNamespaceType.cs: reference, list*,
  toLogicalZone(s), toPhysicalZone(s); AzResourceTypeFactory.cs: a resource's list* methods), or a
  variable whose value contains one (followed through the variable chain).
- src/Bicep.Core/TypeSystem/Providers/ResourceTypeResolver.cs: an `existing` resource whose name,
  scope or parent is itself not a deploy-time constant loses `id` (and that identifier) from its
  readable properties.
- src/Bicep.Core/TypeSystem/TypeAssignmentVisitor.cs (IsPotentiallyDisabledResourceOrModule, since
  commit cc79971cfd): BCP318, a warning, for a property of a conditional resource or module read
  with `.` rather than `.?` or after a non-null assertion `!` (id, name, type, apiVersion exempt).
- src/Bicep.Core/Emit/EmitLimitationCalculator.cs: duplicate resource names (BCP121) and module
  deployment names (BCP122) at one scope, loop names that do not vary (BCP179), names that differ
  only in case (BCP353).

Each finding is (file, line, code, message). Approximations, stated so nobody trusts more than
there is: loop and lambda variables are treated as bound in the whole expression that binds them;
deploy-time-constant flags that the type library puts on nested properties of a resource type are
not known here (none of the types these templates use is known to have one); BCP121/BCP122 compare
the name and scope expressions as text, which finds equal literals and equal expressions but not
two different expressions that evaluate to the same name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# --- tokens -------------------------------------------------------------------------------------

OPERATORS = sorted(
    [
        "...", ".?", "??", "==", "!=", "<=", ">=", "&&", "||", "=>", "=~", "!~", "::",
        "{", "}", "[", "]", "(", ")", ":", ",", ".", "?", "!", "=", "<", ">", "+", "-", "*",
        "/", "%", "@", "|", "^",
    ],
    key=len,
    reverse=True,
)  # fmt: skip
KEYWORDS = {"true", "false", "null", "for", "in", "if", "existing"}
NAMESPACES = {"sys", "az"}
# AzNamespaceType.cs functions flagged FunctionFlags.RequiresInlining (list* is a wildcard).
RUNTIME_FUNCTIONS = {"reference", "toLogicalZone", "toLogicalZones", "toPhysicalZone", "toPhysicalZones"}
READABLE_RESOURCE_PROPERTIES = {"id", "name", "type", "apiVersion"}
READABLE_MODULE_PROPERTIES = {"name"}
RESOURCE_DTC_PROPERTIES = {
    "name", "location", "kind", "subscriptionId", "resourceGroup", "managedBy", "extendedLocation",
    "zones", "placement", "plan", "sku", "identity", "managedByExtended", "tags", "asserts",
    "scope", "parent",
}  # fmt: skip
MODULE_DTC_PROPERTIES = {"name", "scope", "identity"}
RESOURCE_TYPED_PROPERTIES = {"scope", "parent"}


@dataclass
class Tok:
    kind: str  # id, str, num, op, nl
    text: str
    line: int
    parts: list[list[Tok]] = field(default_factory=list)  # interpolations of a str token

    @property
    def literal(self) -> str | None:
        return self.text if self.kind == "str" and not self.parts else None


class BicepSyntaxError(ValueError):
    pass


def _line_of(src: str, pos: int) -> int:
    return src.count("\n", 0, pos) + 1


def _tokenize(src: str, pos: int, stop_at_brace: bool) -> tuple[list[Tok], int]:
    toks: list[Tok] = []
    depth = 0
    n = len(src)
    while pos < n:
        c = src[pos]
        if c == "\n":
            toks.append(Tok("nl", "\n", _line_of(src, pos)))
            pos += 1
        elif c in " \t\r":
            pos += 1
        elif src.startswith("//", pos):
            end = src.find("\n", pos)
            pos = n if end < 0 else end
        elif src.startswith("/*", pos):
            end = src.find("*/", pos + 2)
            if end < 0:
                raise BicepSyntaxError(f"line {_line_of(src, pos)}: unterminated comment (BCP002)")
            pos = end + 2
        elif src.startswith("'''", pos):
            end = src.find("'''", pos + 3)
            if end < 0:
                raise BicepSyntaxError(f"line {_line_of(src, pos)}: unterminated ''' (BCP140)")
            toks.append(Tok("str", src[pos + 3 : end], _line_of(src, pos)))
            pos = end + 3
        elif c == "'":
            line = _line_of(src, pos)
            pos += 1
            text: list[str] = []
            parts: list[list[Tok]] = []
            while True:
                if pos >= n or src[pos] == "\n":
                    raise BicepSyntaxError(f"line {line}: unterminated string (BCP003/BCP004)")
                ch = src[pos]
                if ch == "\\":
                    text.append(src[pos : pos + 2])
                    pos += 2
                elif src.startswith("${", pos):
                    inner, pos = _tokenize(src, pos + 2, stop_at_brace=True)
                    parts.append(inner)
                    text.append("${}")
                elif ch == "'":
                    pos += 1
                    break
                else:
                    text.append(ch)
                    pos += 1
            toks.append(Tok("str", "".join(text), line, parts))
        elif c.isalpha() or c == "_":
            m = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").match(src, pos)
            assert m
            toks.append(Tok("id", m.group(0), _line_of(src, pos)))
            pos = m.end()
        elif c.isdigit():
            m = re.compile(r"[0-9]+").match(src, pos)
            assert m
            toks.append(Tok("num", m.group(0), _line_of(src, pos)))
            pos = m.end()
        else:
            op = next((o for o in OPERATORS if src.startswith(o, pos)), None)
            if op is None:
                raise BicepSyntaxError(f"line {_line_of(src, pos)}: unexpected {c!r} (BCP001)")
            if stop_at_brace and op == "}" and depth == 0:
                return toks, pos + 1
            depth += {"{": 1, "}": -1}.get(op, 0)
            toks.append(Tok("op", op, _line_of(src, pos)))
            pos += len(op)
    if stop_at_brace:
        raise BicepSyntaxError("unterminated ${ interpolation")
    return toks, pos


def tokenize(src: str) -> list[Tok]:
    return _tokenize(src, 0, stop_at_brace=False)[0]


def flatten(toks: list[Tok]) -> list[Tok]:
    """Tokens with every interpolation inlined after its string, in parentheses."""
    out: list[Tok] = []
    for t in toks:
        out.append(Tok(t.kind, t.text, t.line) if t.parts else t)
        for part in t.parts:
            out.append(Tok("op", "(", t.line))
            out.extend(flatten(part))
            out.append(Tok("op", ")", t.line))
    return out


OPEN = {"(": ")", "[": "]", "{": "}"}


def matching(toks: list[Tok], i: int) -> int:
    """Index of the bracket closing toks[i]."""
    depth = 0
    for j in range(i, len(toks)):
        if toks[j].kind == "op" and toks[j].text in OPEN:
            depth += 1
        elif toks[j].kind == "op" and toks[j].text in OPEN.values():
            depth -= 1
            if depth == 0:
                return j
    raise BicepSyntaxError(f"line {toks[i].line}: {toks[i].text!r} is never closed")


def split_top(toks: list[Tok], seps: set[str]) -> list[list[Tok]]:
    """Split at separators (op text or 'nl') that are outside every bracket."""
    chunks: list[list[Tok]] = [[]]
    depth = 0
    for t in toks:
        sep = "nl" if t.kind == "nl" else t.text if t.kind == "op" else None
        if t.kind == "op" and t.text in OPEN:
            depth += 1
        elif t.kind == "op" and t.text in OPEN.values():
            depth -= 1
        if depth == 0 and sep in seps:
            chunks.append([])
        else:
            chunks[-1].append(t)
    return [c for c in chunks if c]


# --- declarations -------------------------------------------------------------------------------


@dataclass
class Prop:
    key: str
    value: list[Tok]
    line: int


@dataclass
class Body:
    """A resource or module value: `{...}`, `if (c) {...}` or `[for x in src: (if (c))? {...}]`."""

    props: list[Prop]
    nested: list[Decl]
    condition: list[Tok] | None = None
    loop_vars: list[str] = field(default_factory=list)
    loop_source: list[Tok] | None = None

    def get(self, key: str) -> Prop | None:
        return next((p for p in self.props if p.key == key), None)


@dataclass
class Decl:
    kind: str  # param, var, resource, module, output, func, type, import, metadata, targetScope
    name: str
    line: int
    value: list[Tok] = field(default_factory=list)  # var/output/param default/targetScope
    type_ref: str = ""  # resource 'type@api' or module path
    existing: bool = False
    body: Body | None = None
    secure: bool = False
    has_default: bool = False
    nullable: bool = False

    @property
    def collection(self) -> bool:
        return self.body is not None and self.body.loop_source is not None

    @property
    def resource_type(self) -> str:
        return self.type_ref.split("@")[0]


def _object_props(toks: list[Tok], i: int, file: str) -> tuple[list[Prop], list[Decl]]:
    """The properties of the object whose `{` is toks[i]."""
    end = matching(toks, i)
    props: list[Prop] = []
    nested: list[Decl] = []
    for chunk in split_top(toks[i + 1 : end], {"nl", ","}):
        if chunk[0].kind == "op" and chunk[0].text == "@":
            continue  # a decorator of a nested declaration: its arguments are literals here
        if (
            chunk[0].kind == "id"
            and chunk[0].text == "resource"
            and len(chunk) > 2
            and chunk[2].kind == "str"
        ):
            nested.append(_declaration(chunk, file, nested=True))
            continue
        if len(chunk) < 2 or chunk[1].text != ":" or chunk[0].kind not in ("id", "str"):
            raise BicepSyntaxError(f"{file}:{chunk[0].line}: expected a property, got {chunk[0].text!r}")
        props.append(Prop(chunk[0].text, chunk[2:], chunk[0].line))
    return props, nested


def _body(toks: list[Tok], file: str) -> Body:
    t0 = toks[0].text
    if t0 == "{":
        props, nested = _object_props(toks, 0, file)
        return Body(props, nested)
    if t0 == "if":
        close = matching(toks, 1)
        body = _body(toks[close + 1 :], file)
        body.condition = toks[2:close]
        return body
    if t0 == "[" and toks[1].text == "for":
        close_all = matching(toks, 0)
        inner = toks[2:close_all]
        k = next(j for j, t in enumerate(inner) if t.kind == "id" and t.text == "in")
        loop_vars = [t.text for t in inner[:k] if t.kind == "id"]
        rest = inner[k + 1 :]
        colon = _top_colon(rest)
        source, after = rest[:colon], rest[colon + 1 :]
        while after and after[0].kind == "nl":
            after = after[1:]
        body = _body(after, file)
        body.loop_vars, body.loop_source = loop_vars, source
        return body
    raise BicepSyntaxError(f"{file}:{toks[0].line}: expected {{, [ or if (BCP118)")


def _top_colon(toks: list[Tok]) -> int:
    depth = 0
    ternary = 0
    for j, t in enumerate(toks):
        if t.kind == "op" and t.text in OPEN:
            depth += 1
        elif t.kind == "op" and t.text in OPEN.values():
            depth -= 1
        elif depth == 0 and t.kind == "op" and t.text == "?":
            ternary += 1
        elif depth == 0 and t.kind == "op" and t.text == ":":
            if ternary == 0:
                return j
            ternary -= 1
    raise BicepSyntaxError(f"line {toks[0].line}: for-expression without ':'")


def _declaration(toks: list[Tok], file: str, nested: bool = False) -> Decl:
    kw = toks[0].text
    line = toks[0].line
    eq = next((j for j, t in enumerate(toks) if t.kind == "op" and t.text == "="), None)
    if kw == "targetScope":
        assert eq is not None
        return Decl("targetScope", "targetScope", line, value=toks[eq + 1 :])
    name = toks[1].text
    if kw in ("resource", "module"):
        if eq is None or toks[2].kind != "str":
            raise BicepSyntaxError(f"{file}:{line}: malformed {kw} {name}")
        existing = any(t.kind == "id" and t.text == "existing" for t in toks[3:eq])
        body = _body(toks[eq + 1 :], file)
        return Decl(kw, name, line, type_ref=toks[2].text, existing=existing, body=body)
    if kw in ("var", "output", "param", "metadata"):
        value = toks[eq + 1 :] if eq is not None else []
        type_toks = toks[2 : eq if eq is not None else len(toks)]
        return Decl(
            kw,
            name,
            line,
            value=value,
            has_default=eq is not None,
            nullable=any(t.text == "?" for t in type_toks),
        )
    if kw in ("func", "type", "import", "extension"):
        return Decl(kw, name, line, value=toks[eq + 1 :] if eq is not None else [])
    raise BicepSyntaxError(f"{file}:{line}: unknown declaration {kw!r} (BCP007)")


@dataclass
class BicepFile:
    name: str
    path: Path
    decls: list[Decl]
    target_scope: str

    def symbols(self) -> dict[str, Decl]:
        return {d.name: d for d in self.decls if d.kind not in ("output", "targetScope", "metadata")}

    def outputs(self) -> list[Decl]:
        return [d for d in self.decls if d.kind == "output"]

    def params(self) -> dict[str, Decl]:
        return {d.name: d for d in self.decls if d.kind == "param"}

    def all_resources(self) -> Iterator[Decl]:
        stack = [d for d in self.decls if d.kind == "resource"]
        while stack:
            d = stack.pop(0)
            yield d
            if d.body:
                stack.extend(d.body.nested)


def parse(src: str, name: str = "<text>", path: Path | None = None) -> BicepFile:
    toks = tokenize(src)
    decls: list[Decl] = []
    pending_secure = False
    for stmt in split_top(toks, {"nl"}):
        if stmt[0].kind == "op" and stmt[0].text == "@":
            deco = stmt[1].text if stmt[1].text not in NAMESPACES else stmt[3].text
            pending_secure = pending_secure or deco == "secure"
            # a decorator can share its line with the declaration (`@secure() param x string`)
            close = matching(stmt, 2) if len(stmt) > 2 and stmt[2].text == "(" else 1
            if stmt[1].text in NAMESPACES:
                close = matching(stmt, 4)
            stmt = stmt[close + 1 :]
            if not stmt:
                continue
        d = _declaration(stmt, name)
        d.secure = pending_secure
        pending_secure = False
        decls.append(d)
    scope_decl = next((d for d in decls if d.kind == "targetScope"), None)
    scope = scope_decl.value[0].text if scope_decl and scope_decl.value else "resourceGroup"
    return BicepFile(name, path or Path(name), decls, scope)


# --- expression scanning ------------------------------------------------------------------------


@dataclass
class Ref:
    name: str
    line: int
    steps: list[tuple[str, str | None]]  # ('prop', name) | ('index', literal or None) | ('call', name)


def _bound_names(toks: list[Tok]) -> set[str]:
    """Loop and lambda variables bound anywhere in the expression."""
    bound: set[str] = set()
    for j, t in enumerate(toks):
        if t.kind == "id" and t.text == "for":
            k = j + 1
            while k < len(toks) and not (toks[k].kind == "id" and toks[k].text == "in"):
                if toks[k].kind == "id":
                    bound.add(toks[k].text)
                k += 1
        if t.kind == "op" and t.text == "=>":
            if toks[j - 1].kind == "id":
                bound.add(toks[j - 1].text)
            elif toks[j - 1].text == ")":
                k = j - 2
                while k >= 0 and toks[k].text != "(":
                    if toks[k].kind == "id":
                        bound.add(toks[k].text)
                    k -= 1
    return bound


def scan(value: list[Tok]) -> tuple[list[Ref], list[tuple[str, int]]]:
    """Symbol references (with what is accessed on them) and function calls in an expression."""
    toks = flatten(value)
    bound = _bound_names(toks)
    refs: list[Ref] = []
    calls: list[tuple[str, int]] = []
    stack: list[str] = []
    for j, t in enumerate(toks):
        prev = toks[j - 1] if j else None
        nxt = toks[j + 1] if j + 1 < len(toks) else None
        if t.kind == "op" and t.text in OPEN:
            stack.append(t.text)
        elif t.kind == "op" and t.text in OPEN.values() and stack:
            stack.pop()
        if t.kind != "id":
            continue
        after_dot = prev is not None and prev.kind == "op" and prev.text in (".", ".?", "::")
        if nxt is not None and nxt.kind == "op" and nxt.text == "(":
            qualified_ns = after_dot and j >= 2 and toks[j - 2].text in NAMESPACES
            if not after_dot or qualified_ns:
                calls.append((t.text, t.line))
            continue
        if after_dot or t.text in KEYWORDS or t.text in bound:
            continue
        if nxt is not None and nxt.kind == "op" and nxt.text == "." and t.text in NAMESPACES:
            continue
        is_key = (
            nxt is not None
            and nxt.text == ":"
            and (prev is None or prev.text in ("{", ",") or prev.kind == "nl")
            and (not stack or stack[-1] == "{")
        )
        if is_key:
            continue
        refs.append(Ref(t.text, t.line, _steps(toks, j + 1)))
    return refs, calls


def _steps(toks: list[Tok], k: int) -> list[tuple[str, str | None]]:
    steps: list[tuple[str, str | None]] = []
    while k < len(toks):
        t = toks[k]
        if t.kind == "op" and t.text == "!":
            k += 1
        elif t.kind == "op" and t.text in (".", ".?") and k + 1 < len(toks) and toks[k + 1].kind == "id":
            is_call = k + 2 < len(toks) and toks[k + 2].text == "("
            steps.append(("call" if is_call else "prop", toks[k + 1].text))
            k += 2
        elif t.kind == "op" and t.text == "[":
            close = matching(toks, k)
            inner = [x for x in toks[k + 1 : close] if x.kind != "nl"]
            if inner and inner[0].text == "?":
                inner = inner[1:]
            literal = inner[0].literal if len(inner) == 1 else None
            steps.append(("index", literal))
            k = close + 1
        else:
            break
    return steps


# --- the rules ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.code} {self.message}"


class Checker:
    def __init__(self, files: dict[str, BicepFile]) -> None:
        self.files = files

    # deploy-time constants ----------------------------------------------------------------------

    def _readable(self, f: BicepFile, d: Decl) -> set[str]:
        if d.kind == "module":
            return READABLE_MODULE_PROPERTIES
        readable = set(READABLE_RESOURCE_PROPERTIES)
        if d.existing and d.body:
            for key in ("name", "scope", "parent"):
                prop = d.body.get(key)
                if prop and self._violations(f, prop.value, key in RESOURCE_TYPED_PROPERTIES, set(), ()):
                    readable -= {"id", key}  # ResourceTypeResolver: a runtime existing resource
        return readable

    def _violations(
        self,
        f: BicepFile,
        value: list[Tok],
        resource_typed: bool,
        seen: set[str],
        chain: tuple[str, ...],
    ) -> list[tuple[int, str]]:
        symbols = f.symbols()
        out: list[tuple[int, str]] = []
        via = f" (through {' -> '.join(chain)})" if chain else ""
        refs, calls = scan(value)
        for name, line in calls:
            if name in RUNTIME_FUNCTIONS or re.match(r"^list", name):
                out.append((line, f"{name}() is evaluated during the deployment{via}"))
        for ref in refs:
            d = symbols.get(ref.name)
            if d is None:
                continue
            if d.kind == "var" and ref.name not in seen:
                out.extend(self._violations(f, d.value, False, seen | {ref.name}, (*chain, ref.name)))
                continue
            if d.kind not in ("resource", "module"):
                continue
            steps = list(ref.steps)
            if d.collection:
                if steps and steps[0][0] == "index":
                    steps = steps[1:]
                else:
                    out.append((ref.line, f"the whole collection {ref.name} is referenced{via}"))
                    continue
            if not steps:
                if not (resource_typed and not chain and "id" in self._readable(f, d)):
                    out.append((ref.line, f"the whole {d.kind} {ref.name} is referenced{via}"))
                continue
            kind, what = steps[0]
            if kind == "call":
                if what and (what.startswith("list") or what == "getSecret"):
                    out.append((ref.line, f"{ref.name}.{what}() is evaluated during the deployment{via}"))
            elif what is None or what not in self._readable(f, d):
                readable = ", ".join(sorted(self._readable(f, d)))
                out.append(
                    (
                        ref.line,
                        f'the property "{what}" of {ref.name} cannot be calculated at the start'
                        f" (readable: {readable}){via}",
                    )
                )
        return out

    def deploy_time_constants(self, f: BicepFile) -> list[Finding]:
        found: list[Finding] = []

        def check(value: list[Tok], code: str, what: str, resource_typed: bool = False) -> None:
            for line, why in self._violations(f, value, resource_typed, set(), ()):
                found.append(Finding(f.name, line, code, f"{what} needs a deploy-time constant: {why}"))

        for d in f.decls:
            if (
                d.kind == "var"
                and d.value
                and d.value[0].text == "["
                and len(d.value) > 1
                and d.value[1].text == "for"
            ):
                check(d.value, "BCP182", f"the for-body of variable {d.name}")
            if d.kind == "func":
                check(d.value, "BCP341", f"function {d.name}")
        for d in [*f.all_resources(), *(m for m in f.decls if m.kind == "module")]:
            assert d.body is not None
            if d.body.condition is not None:
                check(d.body.condition, "BCP177", f"the if-condition of {d.name}")
            if d.body.loop_source is not None:
                check(d.body.loop_source, "BCP178", f"the for-expression of {d.name}")
            if d.existing:
                continue  # DeployTimeConstantContainerVisitor skips existing bodies
            keys = RESOURCE_DTC_PROPERTIES if d.kind == "resource" else MODULE_DTC_PROPERTIES
            for prop in d.body.props:
                if prop.key in keys:
                    check(
                        prop.value,
                        "BCP120",
                        f'"{prop.key}" of {d.name}',
                        prop.key in RESOURCE_TYPED_PROPERTIES,
                    )
        # Every other for-expression's source (property loops, output loops).
        for value in self._all_values(f):
            toks = flatten(value)
            for j, t in enumerate(toks):
                if t.kind == "id" and t.text == "for" and j and toks[j - 1].text == "[":
                    k = next(i for i in range(j, len(toks)) if toks[i].kind == "id" and toks[i].text == "in")
                    rest = toks[k + 1 : matching(toks, j - 1)]
                    check(rest[: _top_colon(rest)], "BCP178", f"a for-expression (line {t.line})")
        return sorted(set(found), key=lambda x: (x.line, x.code, x.message))

    def _all_values(self, f: BicepFile) -> Iterator[list[Tok]]:
        for d in f.decls:
            if d.kind in ("output", "param") or (
                d.kind == "var" and not (d.value and d.value[0].text == "[")
            ):
                yield d.value
        for d in [*f.all_resources(), *(m for m in f.decls if m.kind == "module")]:
            assert d.body is not None
            for p in d.body.props:
                yield p.value

    # names ----------------------------------------------------------------------------------------

    def names(self, f: BicepFile) -> list[Finding]:
        found: list[Finding] = []
        seen: dict[str, Decl] = {}
        for d in f.decls:
            if d.kind in ("targetScope", "output", "metadata"):
                continue
            if d.name in seen:
                found.append(
                    Finding(f.name, d.line, "BCP028", f'identifier "{d.name}" is declared multiple times')
                )
            seen[d.name] = d
        outs: set[str] = set()
        for d in f.outputs():
            if d.name in outs:
                found.append(
                    Finding(f.name, d.line, "BCP145", f'output "{d.name}" is declared multiple times')
                )
            outs.add(d.name)
        for kind in ("param", "var", "output", "type", "func"):
            by_lower: dict[str, set[str]] = {}
            for d in f.decls:
                if d.kind == kind:
                    by_lower.setdefault(d.name.lower(), set()).add(d.name)
            for names in by_lower.values():
                if len(names) > 1:
                    found.append(
                        Finding(f.name, 0, "BCP353", f"{kind}s {sorted(names)} differ only in casing")
                    )
        return found

    def undeclared(self, f: BicepFile) -> list[Finding]:
        declared = set(f.symbols())
        found: list[Finding] = []

        def check(value: list[Tok], local: set[str]) -> None:
            for ref in scan(value)[0]:
                if ref.name not in declared and ref.name not in local:
                    found.append(Finding(f.name, ref.line, "BCP057", f'the name "{ref.name}" does not exist'))

        for d in f.decls:
            if d.kind != "targetScope":
                check(d.value, set())
        for d in [*f.all_resources(), *(m for m in f.decls if m.kind == "module")]:
            assert d.body is not None
            local = set(d.body.loop_vars)
            for part in (d.body.condition or [], d.body.loop_source or []):
                check(part, set())
            for p in d.body.props:
                check(p.value, local)
        return found

    def unused(self, f: BicepFile) -> list[Finding]:
        """Linter rules no-unused-params / no-unused-vars (src/Bicep.Core/Analyzers/Linter/Rules)."""
        used: set[str] = set()
        for value in self._every_expression(f):
            used |= {r.name for r in scan(value)[0]}
        return [
            Finding(f.name, d.line, f"no-unused-{d.kind}s", f"{d.kind} {d.name} is never used")
            for d in f.decls
            if d.kind in ("param", "var") and d.name not in used
        ]

    def _every_expression(self, f: BicepFile) -> Iterator[list[Tok]]:
        for d in f.decls:
            if d.kind != "targetScope":
                yield d.value
        for d in [*f.all_resources(), *(m for m in f.decls if m.kind == "module")]:
            assert d.body is not None
            yield d.body.condition or []
            yield d.body.loop_source or []
            for p in d.body.props:
                yield p.value

    # resources and modules ------------------------------------------------------------------------

    @staticmethod
    def _text(value: list[Tok] | None) -> str:
        return " ".join(
            t.text + "".join("${" + Checker._text(p) + "}" for p in t.parts)
            for t in value or []
            if t.kind != "nl"
        )

    def duplicate_names(self, f: BicepFile) -> list[Finding]:
        found: list[Finding] = []
        groups: dict[tuple[str, ...], list[Decl]] = {}
        for d in f.all_resources():
            assert d.body is not None
            if d.existing or d.collection:
                continue
            name = d.body.get("name")
            key: tuple[str, ...] = (
                "resource",
                d.resource_type.lower(),
                self._text(name.value if name else None),
                self._text(p.value if (p := d.body.get("scope")) else None),
                self._text(p.value if (p := d.body.get("parent")) else None),
            )
            groups.setdefault(key, []).append(d)
        for m in f.decls:
            if m.kind != "module" or m.collection:
                continue
            assert m.body is not None
            name = m.body.get("name")
            if name is None:
                continue
            key = (
                "module",
                self._text(name.value),
                self._text(p.value if (p := m.body.get("scope")) else None),
            )
            groups.setdefault(key, []).append(m)
        for key, decls in groups.items():
            if len(decls) > 1:
                code = "BCP121" if key[0] == "resource" else "BCP122"
                names = ", ".join(d.name for d in decls)
                for d in decls:
                    found.append(
                        Finding(f.name, d.line, code, f"{names} are defined with the same name at one scope")
                    )
        return found

    def loop_names(self, f: BicepFile) -> list[Finding]:
        found: list[Finding] = []
        for d in [*f.all_resources(), *(m for m in f.decls if m.kind == "module")]:
            assert d.body is not None
            if d.body.loop_source is None or d.existing:
                continue
            keys = ("name", "scope", "parent") if d.kind == "resource" else ("name", "scope")
            used = {r.name for k in keys if (p := d.body.get(k)) for r in scan(p.value)[0]}
            if not used & set(d.body.loop_vars):
                found.append(
                    Finding(
                        f.name, d.line, "BCP179", f"the name of loop {d.name} does not use {d.body.loop_vars}"
                    )
                )
        return found

    def _module_file(self, f: BicepFile, m: Decl) -> BicepFile | None:
        target = (f.path.parent / m.type_ref).resolve()
        return next((g for g in self.files.values() if g.path.resolve() == target), None)

    def modules(self, f: BicepFile) -> list[Finding]:
        found: list[Finding] = []
        scope_kind = {
            "resourceGroup": "resourceGroup",
            "subscription": "subscription",
            "managementGroup": "managementGroup",
            "tenant": "tenant",
        }
        symbols = f.symbols()
        for m in (d for d in f.decls if d.kind == "module"):
            assert m.body is not None
            target = self._module_file(f, m)
            if target is None:
                found.append(Finding(f.name, m.line, "BCP091", f"module {m.name}: {m.type_ref} not found"))
                continue
            given = m.body.get("params")
            given_keys: set[str] = set()
            if given:
                props, _ = _object_props(given.value, 0, f.name)
                given_keys = {p.key for p in props}
            declared = target.params()
            for key in sorted(given_keys - set(declared)):
                found.append(
                    Finding(
                        f.name,
                        m.line,
                        "BCP037",
                        f'module {m.name}: "{key}" is not a parameter of {target.name}',
                    )
                )
            for key, p in declared.items():
                if not p.has_default and not p.nullable and key not in given_keys:
                    found.append(
                        Finding(
                            f.name,
                            m.line,
                            "BCP035",
                            f'module {m.name}: required parameter "{key}" is missing',
                        )
                    )
            # scope: omitted means the file's own scope; else the scope function or a resource group symbol
            scope = m.body.get("scope")
            if scope is None:
                supplied = f.target_scope
            else:
                first = next(t for t in scope.value if t.kind != "nl")
                sym = symbols.get(first.text)
                if sym is not None and sym.kind == "resource":
                    supplied = (
                        "resourceGroup"
                        if sym.resource_type.lower() == "microsoft.resources/resourcegroups"
                        else "resource"
                    )
                else:
                    supplied = scope_kind.get(first.text, "unknown")
            if supplied != target.target_scope:
                found.append(
                    Finding(
                        f.name,
                        m.line,
                        "BCP134",
                        f"module {m.name} targets {target.target_scope} but is deployed at {supplied}",
                    )
                )
        # outputs read from modules must exist (BCP053)
        for value in self._every_expression(f):
            for ref in scan(value)[0]:
                d = symbols.get(ref.name)
                if d is None or d.kind != "module":
                    continue
                target = self._module_file(f, d)
                steps = (
                    ref.steps[1:] if d.collection and ref.steps and ref.steps[0][0] == "index" else ref.steps
                )
                if target and len(steps) >= 2 and steps[0] == ("prop", "outputs"):
                    out = steps[1][1]
                    if out not in {o.name for o in target.outputs()}:
                        found.append(
                            Finding(f.name, ref.line, "BCP053", f"{target.name} has no output {out!r}")
                        )
        return found

    # possibly-null access ------------------------------------------------------------------------

    def null_access(self, f: BicepFile) -> list[Finding]:
        """BCP318 (a warning): a property of a resource or module whose condition is not literally
        true, read with `.` (TypeAssignmentVisitor.cs, IsPotentiallyDisabledResourceOrModule): the
        compiler does not narrow through a ternary on the same condition. `.?` and a non-null
        assertion (`res!.x`) are the compiler's fixes; id, name, type and apiVersion of a resource
        (EmitConstants.ResourceInfoProperties) and a module's name are exempt. Not modelled: the
        condition of a parent resource, and `@nullIfNotFound()` existing resources."""
        conditional = {
            d.name: d
            for d in [*f.all_resources(), *(m for m in f.decls if m.kind == "module")]
            if d.body is not None and d.body.condition is not None and self._text(d.body.condition) != "true"
        }
        found: list[Finding] = []
        for value in self._every_expression(f):
            toks = [t for t in flatten(value) if t.kind != "nl"]
            bound = _bound_names(toks)
            for j, t in enumerate(toks):
                d = conditional.get(t.text) if t.kind == "id" else None
                if d is None or t.text in bound:
                    continue
                if j and toks[j - 1].kind == "op" and toks[j - 1].text in (".", ".?", "::"):
                    continue
                k = j + 1
                if d.collection and k < len(toks) and toks[k].text == "[":
                    k = matching(toks, k) + 1
                if k + 1 >= len(toks) or toks[k].text != "." or toks[k + 1].kind != "id":
                    continue  # `.?`, `!`, a whole reference or a key
                prop = toks[k + 1].text
                exempt = {"name"} if d.kind == "module" else {"id", "name", "type", "apiVersion"}
                if prop not in exempt:
                    found.append(
                        Finding(
                            f.name,
                            t.line,
                            "BCP318",
                            f"{d.name}.{prop}: {d.name} may be null (condition "
                            f"{self._text(d.body.condition if d.body else None)}); use .? or {d.name}!",
                        )
                    )
        return found

    def all(self, f: BicepFile) -> list[Finding]:
        return [
            *self.deploy_time_constants(f),
            *self.null_access(f),
            *self.names(f),
            *self.undeclared(f),
            *self.unused(f),
            *self.duplicate_names(f),
            *self.loop_names(f),
            *self.modules(f),
        ]


def load(root: Path) -> dict[str, BicepFile]:
    return {
        p.relative_to(root).as_posix(): parse(
            p.read_text(encoding="utf-8"), p.relative_to(root).as_posix(), p
        )
        for p in sorted(root.rglob("*.bicep"))
    }


# --- a small evaluator, for the few expressions whose value a test pins -------------------------


class _Eval:
    """Evaluates literals, parameters, variables, ternaries, `!`, `==`, `!=`, array and object
    literals, for-expressions without a filter, property access, string interpolation and the functions in
    _call. A ternary evaluates only the branch its condition picks, as ARM's if() does (the other
    is parsed, not evaluated), so `useX ? x : 'evgt-${uniqueString(...)}'` has a value when useX
    holds. Anything else raises, so a test never passes on a construct it does not understand."""

    def __init__(self, f: BicepFile, params: dict[str, object], subscription_id: str) -> None:
        self.f = f
        self.params = params
        self.subscription_id = subscription_id
        self.skipping = 0  # > 0 while parsing a branch a ternary did not pick

    def var(self, name: str, local: dict[str, object] | None = None) -> object:
        d = self.f.symbols()[name]
        if d.kind == "param":
            return self.params[name] if name in self.params else self.expr(d.value, {})
        if d.kind != "var":
            raise NotImplementedError(f"{name} is a {d.kind}")
        return self.expr(d.value, {})

    def expr(self, toks: list[Tok], local: dict[str, object]) -> object:
        self.toks = toks
        self.i = 0
        value = self._ternary(local)
        self._skip_nl()
        if self.i != len(self.toks):
            raise NotImplementedError(f"unparsed: {[t.text for t in self.toks[self.i :]]}")
        return value

    def _skipped(self, local: dict[str, object]) -> None:
        self.skipping += 1
        try:
            self._ternary(local)
        finally:
            self.skipping -= 1

    def _interpolate(self, t: Tok, local: dict[str, object]) -> object:
        pieces = t.text.replace("\\'", "'").replace("\\\\", "\\").split("${}")
        out = pieces[0]
        for part, piece in zip(t.parts, pieces[1:], strict=True):
            saved = (self.toks, self.i)
            value = self.expr(part, local)
            self.toks, self.i = saved
            if self.skipping:
                continue
            if not isinstance(value, str | int | bool):
                raise NotImplementedError(f"interpolation of {value!r}")
            out += (str(value).lower() if isinstance(value, bool) else str(value)) + piece
        return None if self.skipping else out

    def _skip_nl(self) -> None:
        while self.i < len(self.toks) and self.toks[self.i].kind == "nl":
            self.i += 1

    def _peek(self) -> Tok | None:
        self._skip_nl()
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _take(self, text: str) -> None:
        t = self._peek()
        if t is None or t.text != text:
            raise NotImplementedError(f"expected {text!r}, got {t.text if t else 'end'!r}")
        self.i += 1

    def _ternary(self, local: dict[str, object]) -> object:
        cond = self._compare(local)
        t = self._peek()
        if t is not None and t.kind == "op" and t.text == "?":
            self.i += 1
            if cond or self.skipping:
                a = self._ternary(local)
                self._take(":")
                self._skipped(local)
                return a
            self._skipped(local)
            self._take(":")
            return self._ternary(local)
        return cond

    def _compare(self, local: dict[str, object]) -> object:
        left = self._unary(local)
        t = self._peek()
        if t is not None and t.kind == "op" and t.text in ("==", "!="):
            self.i += 1
            right = self._unary(local)
            return (left == right) == (t.text == "==")
        return left

    def _unary(self, local: dict[str, object]) -> object:
        t = self._peek()
        if t is not None and t.kind == "op" and t.text == "!":
            self.i += 1
            return not self._unary(local)
        return self._postfix(local)

    def _postfix(self, local: dict[str, object]) -> object:
        value = self._primary(local)
        while (t := self._peek()) is not None and t.kind == "op" and t.text == ".":
            self.i += 1
            name = self.toks[self.i].text
            self.i += 1
            if self.skipping:
                continue
            if not isinstance(value, dict):
                raise NotImplementedError(f".{name} on {value!r}")
            value = value[name]
        return value

    def _args(self, local: dict[str, object]) -> list[object]:
        self._take("(")
        args: list[object] = []
        while (t := self._peek()) is not None and t.text != ")":
            args.append(self._ternary(local))
            if (t := self._peek()) is not None and t.text == ",":
                self.i += 1
        self._take(")")
        return args

    def _primary(self, local: dict[str, object]) -> object:
        t = self._peek()
        if t is None:
            raise NotImplementedError("unexpected end")
        self.i += 1
        at = self.i - 1
        if t.kind == "str":
            if t.parts:
                return self._interpolate(t, local)
            return t.text.replace("\\'", "'").replace("\\\\", "\\")
        if t.kind == "num":
            return int(t.text)
        if t.kind == "id" and t.text in ("true", "false"):
            return t.text == "true"
        if t.text == "(":
            value = self._ternary(local)
            self._take(")")
            return value
        if t.text == "{":
            close = matching(self.toks, at)
            obj: dict[str, object] = {}
            for entry in split_top(self.toks[at + 1 : close], {"nl", ","}):
                colon = _top_colon(entry)
                key = entry[0].text
                saved = (self.toks, self.i)
                obj[key] = self.expr(entry[colon + 1 :], local)
                self.toks, self.i = saved
            self.i = close + 1
            return None if self.skipping else obj
        if t.text == "[":
            nxt = self._peek()
            if nxt is not None and nxt.text == "for":
                return self._for(local, at)
            items: list[object] = []
            while (n := self._peek()) is not None and n.text != "]":
                items.append(self._ternary(local))
                if (n := self._peek()) is not None and n.text == ",":
                    self.i += 1
            self._take("]")
            return items
        if t.kind == "id":
            nxt = self.toks[self.i] if self.i < len(self.toks) else None
            if nxt is not None and nxt.text == "(":
                return self._call(t.text, self._args(local))
            if t.text in local:
                return local[t.text]
            if self.skipping:
                return None
            saved = (self.toks, self.i)
            value = self.var(t.text)
            self.toks, self.i = saved
            return value
        raise NotImplementedError(f"token {t.text!r}")

    def _for(self, local: dict[str, object], open_at: int) -> object:
        close = matching(self.toks, open_at)
        self._take("for")
        name = self.toks[self.i].text
        self.i += 1
        self._take("in")
        source = self._ternary(local)
        self._take(":")
        if self.skipping:
            self.i = close + 1
            return None
        if not isinstance(source, list):
            raise NotImplementedError("loop over a non-array")
        start = self.i
        out: list[object] = []
        for item in source:
            self.i = start
            out.append(self._ternary({**local, name: item}))
            if self._peek() is not self.toks[close]:
                raise NotImplementedError("for-body not understood")
        self.i = close + 1
        return out

    def _call(self, name: str, args: list[object]) -> object:
        if self.skipping:
            return None
        if name == "subscription" and not args:
            return {"subscriptionId": self.subscription_id, "id": f"/subscriptions/{self.subscription_id}"}
        if name == "split":
            s, sep = args
            assert isinstance(s, str) and isinstance(sep, str)
            return s.split(sep)
        if name == "replace":
            text, old, new = args
            assert isinstance(text, str) and isinstance(old, str) and isinstance(new, str)
            return text.replace(old, new)
        if name == "trim":
            assert isinstance(args[0], str)
            return args[0].strip(" ")
        if name == "toLower":
            assert isinstance(args[0], str)
            return args[0].lower()
        if name == "empty":
            return not args[0]
        if name == "join":
            items, sep = args
            assert isinstance(items, list) and isinstance(sep, str)
            return sep.join(str(x) for x in items)
        if name == "union":
            merged: list[object] = []
            for arr in args:
                assert isinstance(arr, list)
                merged.extend(x for x in arr if x not in merged)
            return merged
        raise NotImplementedError(f"function {name}()")


def evaluate(f: BicepFile, name: str, params: dict[str, object], subscription_id: str) -> object:
    """The value of variable `name` of `f` for the given parameters."""
    return _Eval(f, params, subscription_id).var(name)


def module_params(
    f: BicepFile, module: str, params: dict[str, object], subscription_id: str
) -> dict[str, object]:
    """What module `module` of `f` is given, evaluated for the given parameters of `f` (every
    property of its `params` object must be a value the evaluator understands)."""
    d = f.symbols()[module]
    assert d.kind == "module" and d.body is not None
    given = d.body.get("params")
    assert given is not None, f"{module} has no params"
    toks = given.value
    assert toks[0].text == "{" and matching(toks, 0) == len(toks) - 1
    out: dict[str, object] = {}
    for entry in split_top(toks[1:-1], {"nl", ","}):
        colon = _top_colon(entry)
        out[entry[0].text] = _Eval(f, params, subscription_id).expr(entry[colon + 1 :], {})
    return out
