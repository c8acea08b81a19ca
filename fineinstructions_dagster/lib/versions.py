"""Code versions: what Dagster compares to tell that an asset's code changed since it was materialized (the UI's
"code version changed", `AutomationCondition.code_version_changed`), also fed to the chunk parts' definition hash
so that resumed parts made by other code are redone.

A stage's version is a hash of the code of the modules that make its output (its `stages.*` logic and `prompts.*`
templates, whose prompt version constants are part of that code), read as Python syntax: comments, docstrings and
formatting leave it unchanged, any change to what the code does changes it. Computed at import from the source
files (no settings, no environment: those are the run's, not the code's)."""

from __future__ import annotations

import ast
import hashlib
import inspect
from types import ModuleType


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def code_fingerprint(source: str) -> str:
    """A short hash of Python `source` as syntax: the same for any comment, docstring or layout."""
    return hashlib.sha256(ast.dump(_without_docstrings(ast.parse(source))).encode()).hexdigest()[:12]


def code_version(*modules: ModuleType) -> str:
    """The code version of a stage made by `modules` (order-independent)."""
    parts = sorted(f"{m.__name__}={code_fingerprint(inspect.getsource(m))}" for m in modules)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
