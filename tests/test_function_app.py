"""The Functions entry point imports cleanly and the engine never imports azure.functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_function_app_imports() -> None:
    import azure.functions as func

    import function_app

    assert isinstance(function_app.app, func.FunctionApp)


def test_engine_never_imports_azure_functions() -> None:
    offenders = []
    for path in (ROOT / "shared").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "azure.functions" or n.startswith("azure.functions.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
