"""Every public function and class of the library and the pipeline says what it is for."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_public_definitions_have_docstrings():
    missing = []
    for package in ("clipmodel", "pipeline"):
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.parse(path.read_text()).body:
                if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
                        and ast.get_docstring(node) is None):
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert missing == []
