"""Prompt templates for zero-shot classification (torch-free: the ONNX runtime reads them too)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def load_templates(path: str | Path) -> list[str]:
    """One template per line with a `{}` for the class name; blank lines and `#` comments skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"{path}: every template needs exactly one '{{}}' (bad: {bad[:3]})")
    return templates
