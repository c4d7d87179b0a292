"""A small evaluator for the subset of Windows PowerShell 5.1 that remediate.ps1's conditional re-key
is written in, so that tests can run the script's own comparisons without PowerShell.

It walks the tree-sitter AST (the grammar tests/test_guest_scripts.py parses with) and knows only
what the script uses: assignments, if/elseif/else, foreach, return, try/catch, function calls with
positional arguments, ``[ordered]@{...}`` and ``@(...)``, casts to ``[string]``/``[bool]``/
``[int]``/``[int64]``/``[uint32]``/``[object[]]``, the comparison operators the script uses, string
methods ``Contains``/``Split``/``StartsWith`` and ``ArrayList.Add``/``ToArray``. Anything else
raises :class:`Unsupported` (a test then fails: the evaluator must learn it, with its semantics, or
the script must not use it). The semantics followed, each from Microsoft's PowerShell reference
(MicrosoftDocs/PowerShell-Docs reference/5.1/Microsoft.PowerShell.Core/About/):

- ``about_Comparison_Operators``: ``-eq``/``-ne``/``-lt``/``-gt`` ignore case, the ``c`` forms keep
  it; the right operand is converted to the left one's type; ``-contains`` tests a collection's
  items for equality; ``-match``/``-notmatch`` use .NET regular expressions.
- ``about_Logical_Operators``: ``-and``/``-or`` short-circuit; ``-not`` negates the operand's truth.
- ``about_Booleans``: ``$null``, 0, '' and an empty collection are false; a one-item collection is
  what its item is.
- ``about_Hash_Tables``: keys ignore case; ``$h.key`` reads a key, and a missing one is ``$null``.
- ``about_Return`` and ``about_Operators`` (comma operator): a function's output is enumerated,
  so ``return ,$list`` hands over the list itself and ``return $list`` its items.
- ``about_Properties``: a property of ``$null`` is ``$null`` (not strict mode); a method call on
  ``$null`` is an error (caught by ``try``/``catch``); ``.Count`` of ``$null`` is 0, of a scalar 1.
- ``about_Variables``/``about_Scopes``: names ignore case; ``$script:x`` is the script's variable.
- .NET: ``String.Contains`` is ordinal; ``StartsWith(s, StringComparison.OrdinalIgnoreCase)``
  compares ordinal upper-cased characters, ``StartsWith(s, Ordinal)`` exact ones.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import tree_sitter_powershell as tsp
from tree_sitter import Language, Node, Parser, Tree

PARSER = Parser(Language(tsp.language()))


class Unsupported(Exception):
    """The script uses something this evaluator does not model."""


class PsRuntimeError(Exception):
    """An error PowerShell raises at run time (``try``/``catch`` catches it)."""


class ArrayList(list[Any]):
    """System.Collections.ArrayList."""


class PsArray(list[Any]):
    """object[] (``@(...)``, ``,x``, ``a, b``)."""


class CaseDict(dict[str, Any]):
    """A hashtable (``[ordered]@{}``): keys ignore case, insertion order kept."""

    def _find(self, key: str) -> str | None:
        for existing in self:
            if existing.lower() == key.lower():
                return existing
        return None

    def get_ci(self, key: str) -> Any:
        found = self._find(key)
        return None if found is None else self[found]

    def set_ci(self, key: str, value: Any) -> None:
        found = self._find(key)
        self[found if found is not None else key] = value


@dataclass
class ScriptBlock:
    node: Node


class _Return(Exception):
    def __init__(self, output: list[Any]) -> None:
        self.output = output


class _Exit(Exception):
    pass


def text(node: Node) -> str:
    return (node.text or b"").decode("utf-8")


def _named(node: Node) -> list[Node]:
    return [child for child in node.children if child.is_named and child.type != "comment"]


def truthy(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str):
        return value != ""
    if isinstance(value, list):
        if len(value) == 0:
            return False
        return truthy(value[0]) if len(value) == 1 else True
    return True


def to_string(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, list):
        return " ".join(to_string(item) for item in value)
    raise Unsupported(f"[string] of {type(value).__name__}")


def to_int(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
        return int(value)
    raise PsRuntimeError(f"Cannot convert value {value!r} to type System.Int32")


def _equal(left: Any, right: Any, *, case: bool) -> bool:
    if left is None or right is None:
        return left is None and right is None
    if isinstance(left, str):
        other = to_string(right)
        return left == other if case else left.lower() == other.lower()
    if isinstance(left, bool):
        return left == truthy(right)
    if isinstance(left, int):
        try:
            return left == to_int(right)
        except PsRuntimeError:
            return False
    raise Unsupported(f"-eq on {type(left).__name__}")


def _regex(pattern: str, *, case: bool) -> re.Pattern[str]:
    # .NET \z is Python \Z; [A-Za-z0-9] stays ASCII with case kept (RegexOptions.None).
    return re.compile(pattern.replace(r"\z", r"\Z"), 0 if case else re.IGNORECASE)


def _ordinal_upper(value: str) -> str:
    return "".join(char.upper() if len(char.upper()) == 1 else char for char in value)


STATIC = {("system.stringcomparison", "ordinalignorecase"): "OrdinalIgnoreCase"}
STATIC |= {("system.stringcomparison", "ordinal"): "Ordinal"}


def _walk(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from _walk(child)


@functools.lru_cache(maxsize=64)
def _parsed(src: bytes) -> tuple[Tree, dict[str, Node], tuple[str, ...]]:
    """The tree, the script's functions by name, its parameter names."""
    tree = PARSER.parse(src)
    root = tree.root_node
    functions: dict[str, Node] = {}
    parameters: list[str] = []
    for node in _walk(root):
        if node.type == "function_statement":
            name = next(c for c in node.children if c.type == "function_name")
            functions[text(name).lower()] = node
    block = next((c for c in root.children if c.type == "param_block"), None)
    for parameter in (c for c in _walk(block) if c.type == "script_parameter") if block else ():
        parameters.append(text(next(c for c in parameter.children if c.type == "variable"))[1:].lower())
    return tree, functions, tuple(parameters)


@functools.lru_cache(maxsize=256)
def _function_parameters(src: bytes, head: str) -> tuple[str, ...]:
    """A function's parameters: ``function F($a, $b)`` or its body's first ``param(...)``."""
    _, functions, _ = _parsed(src)
    function = next(f for f in functions.values() if text(f).split("{", 1)[0] == head)
    body = next(c for c in function.children if c.type == "script_block")
    holders = [c for c in function.children if c.type == "function_parameter_declaration"]
    holders += [c for c in body.children if c.type == "param_block"]
    names: list[str] = []
    for holder in holders[:1]:
        for node in _walk(holder):
            if node.type == "script_parameter":
                variable = next(c for c in node.children if c.type == "variable")
                names.append(text(variable)[1:].lower())
    return tuple(names)


@dataclass
class Interpreter:
    """Runs a script (or its functions) with ``commands`` standing in for cmdlets and functions."""

    src: bytes
    commands: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    output: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tree, self.functions, self.parameters = _parsed(self.src)
        self.root = self.tree.root_node
        self.script_scope: dict[str, Any] = {}
        self.scopes: list[dict[str, Any]] = [self.script_scope]

    @staticmethod
    def _walk(node: Node) -> Iterator[Node]:
        yield node
        for child in node.children:
            yield from Interpreter._walk(child)

    # --- running -----------------------------------------------------------------------------

    def run_script(self, parameters: Mapping[str, str]) -> list[Any]:
        """The whole file: param values bound by name (ignoring case), '' for the others."""
        given = {key.lower(): value for key, value in parameters.items()}
        for name in self.parameters:
            self.script_scope[name] = given.get(name, "")
        try:
            for statement in _named(self.root):
                if statement.type in ("param_block", "function_statement"):
                    continue
                self.output.extend(self.statement(statement))
        except _Exit:
            pass
        return self.output

    def call(self, name: str, args: list[Any]) -> Any:
        """Call a script function or a stand-in; returns what PowerShell would assign."""
        stand_in = self.commands.get(name.lower())
        if stand_in is not None:
            return stand_in(self, *args)
        function = self.functions.get(name.lower())
        if function is None:
            raise Unsupported(f"command {name}")
        scope: dict[str, Any] = {}
        names = self._parameter_names(function)
        for index, parameter in enumerate(names):
            scope[parameter] = args[index] if index < len(args) else None
        self.scopes.append(scope)
        try:
            body = next(c for c in function.children if c.type == "script_block")
            produced = self.block(body)
        except _Return as returned:
            produced = returned.output
        finally:
            self.scopes.pop()
        if not produced:
            return None
        return produced[0] if len(produced) == 1 else PsArray(produced)

    def _parameter_names(self, function: Node) -> list[str]:
        return list(_function_parameters(self.src, text(function).split("{", 1)[0]))

    # --- statements ----------------------------------------------------------------------------

    def block(self, node: Node) -> list[Any]:
        produced: list[Any] = []
        for child in _named(node):
            if child.type in ("statement_list", "script_block_body", "statement_block"):
                produced.extend(self.block(child))
            elif child.type == "param_block":
                continue
            else:
                produced.extend(self.statement(child))
        return produced

    def statement(self, node: Node) -> list[Any]:
        kind = node.type
        if kind == "function_statement":
            return []
        if kind == "if_statement":
            return self._if(node)
        if kind == "foreach_statement":
            return self._foreach(node)
        if kind == "try_statement":
            return self._try(node)
        if kind == "flow_control_statement":
            word = text(node.children[0]).lower()
            if word == "exit":
                raise _Exit()
            if word != "return":
                raise Unsupported(word)
            value = _named(node)
            raise _Return(self._emit(self.expression(value[0])) if value else [])
        if kind in ("statement_list", "statement_block"):
            return self.block(node)
        if kind == "pipeline":
            return self._pipeline_statement(node)
        raise Unsupported(f"statement {kind}: {text(node)[:60]}")

    def _pipeline_statement(self, node: Node) -> list[Any]:
        children = _named(node)
        if len(children) == 1 and children[0].type == "assignment_expression":
            self._assign(children[0])
            return []
        return self._emit(self.expression(node))

    def _emit(self, value: Any) -> list[Any]:
        if isinstance(value, list):
            return list(value)
        return [] if value is None else [value]

    def _assign(self, node: Node) -> None:
        left, operator, right = node.children[0], node.children[1], node.children[2]
        if text(operator) != "=":
            raise Unsupported(f"assignment {text(operator)}")
        value = self.expression(right)
        target = self._unwrap(left)
        if target.type == "variable":
            name = text(target)[1:].lower()
            if name == "null":
                return
            if name.startswith("script:"):
                self.script_scope[name.removeprefix("script:")] = value
            else:
                self.scopes[-1][name] = value
            return
        if target.type == "member_access":
            owner = self.expression(target.children[0])
            member = text(target.children[-1])
            if not isinstance(owner, CaseDict):
                raise Unsupported(f"property assignment on {type(owner).__name__}")
            owner.set_ci(member, value)
            return
        raise Unsupported(f"assignment to {target.type}")

    def _unwrap(self, node: Node) -> Node:
        while len(_named(node)) == 1 and node.type not in (
            "variable",
            "member_access",
            "parenthesized_expression",
        ):
            node = _named(node)[0]
        return node

    def _if(self, node: Node) -> list[Any]:
        children = node.children
        condition = next(c for c in children if c.type == "pipeline")
        then = next(c for c in children if c.type == "statement_block")
        if truthy(self.expression(condition)):
            return self.block(then)
        for child in children:
            if child.type == "elseif_clauses":
                for clause in _named(child):
                    test = next(c for c in clause.children if c.type == "pipeline")
                    if truthy(self.expression(test)):
                        return self.block(next(c for c in clause.children if c.type == "statement_block"))
            if child.type == "else_clause":
                return self.block(next(c for c in child.children if c.type == "statement_block"))
        return []

    def _foreach(self, node: Node) -> list[Any]:
        variable = text(next(c for c in node.children if c.type == "variable"))[1:].lower()
        source = self.expression(next(c for c in node.children if c.type == "pipeline"))
        items = list(source) if isinstance(source, list) else ([] if source is None else [source])
        produced: list[Any] = []
        for item in items:
            self.scopes[-1][variable] = item
            produced.extend(self.block(next(c for c in node.children if c.type == "statement_block")))
        return produced

    def _try(self, node: Node) -> list[Any]:
        body = next(c for c in node.children if c.type == "statement_block")
        try:
            return self.block(body)
        except PsRuntimeError as error:
            clauses = next(c for c in node.children if c.type == "catch_clauses")
            clause = _named(clauses)[0]
            self.scopes[-1]["_"] = error
            return self.block(next(c for c in clause.children if c.type == "statement_block"))

    # --- expressions ---------------------------------------------------------------------------

    def expression(self, node: Node) -> Any:
        kind = node.type
        children = _named(node)
        if kind == "variable":
            return self._variable(text(node)[1:].lower())
        if kind == "string_literal":
            return self._string(node)
        if kind in ("integer_literal", "decimal_integer_literal"):
            return int(text(node))
        if kind == "parenthesized_expression":
            return self.expression(next(c for c in node.children if c.type == "pipeline"))
        if kind == "array_expression":
            inner = [c for c in node.children if c.type == "statement_list"]
            return PsArray(self.block(inner[0]) if inner else [])
        if kind == "hash_literal_expression":
            return self._hash(node)
        if kind == "script_block_expression":
            return ScriptBlock(node)
        if kind == "command":
            return self._command(node)
        if kind == "member_access":
            return self._member(node)
        if kind == "invokation_expression":
            return self._invoke(node)
        if kind == "cast_expression":
            return self._cast(text(node.children[0]), self.expression(node.children[1]))
        if kind == "expression_with_unary_operator" and len(node.children) > 1:
            operator = text(node.children[0]).lower()
            if operator == "-not" or operator == "!":
                return not truthy(self.expression(node.children[1]))
            if operator == ",":
                return PsArray([self.expression(node.children[1])])
            raise Unsupported(f"unary {operator}")
        if kind == "pipeline" and any(c.type == "|" for c in node.children):
            raise Unsupported("pipelines")
        if kind in ("logical_expression", "logical_argument_expression") and len(children) > 1:
            return self._logical(node)
        if kind in ("comparison_expression", "comparison_argument_expression") and len(children) > 1:
            return self._compare(node)
        if kind in ("additive_expression", "additive_argument_expression") and len(children) > 1:
            return self._add(node)
        if kind == "array_literal_expression" and len(children) > 1:
            return PsArray(self.expression(c) for c in children)
        if len(children) == 1:
            return self.expression(children[0])
        raise Unsupported(f"expression {kind}: {text(node)[:60]}")

    def _variable(self, name: str) -> Any:
        if name == "null":
            return None
        if name == "true":
            return True
        if name == "false":
            return False
        if name.startswith("script:"):
            return self.script_scope.get(name.removeprefix("script:"))
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def _string(self, node: Node) -> str:
        raw = text(node)
        if raw.startswith("'") and raw.endswith("'"):
            return raw[1:-1].replace("''", "'")
        if raw.startswith('"') and "$" not in raw and "`" not in raw:
            return raw[1:-1]
        raise Unsupported(f"string {raw[:40]}")

    def _hash(self, node: Node) -> CaseDict:
        table = CaseDict()
        body = [c for c in node.children if c.type == "hash_literal_body"]
        for entry in _named(body[0]) if body else []:
            key = text(next(c for c in entry.children if c.type == "key_expression"))
            value = next(c for c in entry.children if c.type == "pipeline" or c.type == "statement")
            table.set_ci(key, self.expression(value))
        return table

    def _command(self, node: Node) -> Any:
        name = text(next(c for c in node.children if c.type == "command_name"))
        elements = [c for c in node.children if c.type == "command_elements"]
        args: list[Any] = []
        named: dict[str, Any] = {}
        pending: str | None = None
        for element in _named(elements[0]) if elements else []:
            if element.type == "command_argument_sep":
                continue
            if element.type == "command_parameter":
                pending = text(element).lstrip("-").lower()
                named[pending] = True
                continue
            value = text(element) if element.type == "generic_token" else self.expression(element)
            if pending is not None:
                named[pending], pending = value, None
            else:
                args.append(value)
        if name.lower() == "new-object" and args == ["System.Collections.ArrayList"] and not named:
            return ArrayList()
        if named and name.lower() not in self.commands:
            raise Unsupported(f"named parameters {sorted(named)} to {name}")
        return self.call(name, args)

    def _member(self, node: Node) -> Any:
        if any(c.type == "::" for c in node.children):
            owner = text(node.children[0]).strip("[]").lower()
            member = text(node.children[-1]).lower()
            if (owner, member) not in STATIC:
                raise Unsupported(f"[{owner}]::{member}")
            return STATIC[(owner, member)]
        owner = self.expression(node.children[0])
        member = text(node.children[-1])
        if isinstance(owner, CaseDict):
            if member.lower() == "count" and owner.get_ci("count") is None:
                return len(owner)
            return owner.get_ci(member)
        if member.lower() == "count":
            if owner is None:
                return 0
            return len(owner) if isinstance(owner, list) else 1
        if member.lower() == "length" and isinstance(owner, str):
            return len(owner)
        if owner is None:
            return None
        if isinstance(owner, list):  # member enumeration
            return PsArray(self._member_of(item, member) for item in owner)
        return self._member_of(owner, member)

    def _member_of(self, owner: Any, member: str) -> Any:
        if isinstance(owner, CaseDict):
            return owner.get_ci(member)
        raise Unsupported(f"property {member} of {type(owner).__name__}")

    def _invoke(self, node: Node) -> Any:
        target = node.children[0]
        method = text(next(c for c in node.children if c.type == "member_name"))
        arguments = next(c for c in node.children if c.type == "argument_list")
        listed = [c for c in arguments.children if c.type == "argument_expression_list"]
        args = [self.expression(a) for a in _named(listed[0])] if listed else []
        owner = self.expression(target)
        if owner is None:
            raise PsRuntimeError("You cannot call a method on a null-valued expression.")
        name = method.lower()
        if isinstance(owner, str):
            if name == "contains" and len(args) == 1:
                return to_string(args[0]) in owner
            if name == "split" and len(args) == 1 and len(to_string(args[0])) == 1:
                return PsArray(owner.split(to_string(args[0])))
            if name == "startswith" and len(args) == 2:
                prefix, comparison = to_string(args[0]), args[1]
                if comparison == "OrdinalIgnoreCase":
                    return _ordinal_upper(owner).startswith(_ordinal_upper(prefix))
                if comparison == "Ordinal":
                    return owner.startswith(prefix)
            raise Unsupported(f"string method {method} with {len(args)} arguments")
        if isinstance(owner, ArrayList):
            if name == "add" and len(args) == 1:
                owner.append(args[0])
                return len(owner) - 1
            if name == "toarray" and not args:
                return PsArray(owner)
        raise Unsupported(f"method {method} of {type(owner).__name__}")

    def _cast(self, type_name: str, value: Any) -> Any:
        name = type_name.strip().lower()
        name = name[1:-1] if name.startswith("[") and name.endswith("]") else name
        if name == "string":
            return to_string(value)
        if name == "bool":
            return truthy(value)
        if name in ("int", "int64", "long", "uint32"):
            number = to_int(value)
            if name == "uint32" and not 0 <= number <= 2**32 - 1:
                raise PsRuntimeError(f"{number} is out of range for System.UInt32")
            return number
        if name == "object[]":
            return PsArray(value if isinstance(value, list) else ([] if value is None else [value]))
        if name == "ordered" and isinstance(value, CaseDict):
            return value
        raise Unsupported(f"cast {type_name}")

    def _logical(self, node: Node) -> bool:
        parts = node.children
        result = truthy(self.expression(parts[0]))
        for index in range(1, len(parts), 2):
            operator = text(parts[index]).lower()
            if operator == "-or":
                result = result or truthy(self.expression(parts[index + 1]))
            elif operator == "-and":
                result = result and truthy(self.expression(parts[index + 1]))
            else:
                raise Unsupported(f"logical {operator}")
        return result

    def _compare(self, node: Node) -> Any:
        parts = node.children
        if len(parts) != 3:
            raise Unsupported(f"comparison chain {text(node)[:60]}")
        left = self.expression(parts[0])
        operator = text(parts[1]).lower()
        right = self.expression(parts[2])
        case = operator.startswith("-c")
        base = "-" + operator[2:] if case or operator.startswith("-i") else operator
        if base == "-join":
            items = left if isinstance(left, list) else [left]
            return to_string(right).join(to_string(item) for item in items)
        if base in ("-contains", "-notcontains"):
            items = left if isinstance(left, list) else [left]
            found = any(_equal(item, right, case=case) for item in items)
            return found if base == "-contains" else not found
        if isinstance(left, list):
            raise Unsupported(f"{operator} with a collection on the left")
        if base in ("-eq", "-ne"):
            same = _equal(left, right, case=case)
            return same if base == "-eq" else not same
        if base in ("-match", "-notmatch"):
            found = _regex(to_string(right), case=case).search(to_string(left)) is not None
            return found if base == "-match" else not found
        if base in ("-lt", "-gt", "-le", "-ge"):
            if isinstance(left, int) and not isinstance(left, bool):
                a: Any = left
                b: Any = to_int(right)
            else:
                a, b = to_string(left), to_string(right)
                if not case:
                    a, b = a.lower(), b.lower()
            return {"-lt": a < b, "-gt": a > b, "-le": a <= b, "-ge": a >= b}[base]
        raise Unsupported(f"operator {operator}")

    def _add(self, node: Node) -> Any:
        parts = node.children
        result = self.expression(parts[0])
        for index in range(1, len(parts), 2):
            if text(parts[index]) != "+":
                raise Unsupported(f"operator {text(parts[index])}")
            right = self.expression(parts[index + 1])
            if isinstance(result, str):
                result = result + to_string(right)
            elif isinstance(result, int) and not isinstance(result, bool):
                result = result + to_int(right)
            else:
                raise Unsupported(f"+ on {type(result).__name__}")
        return result
