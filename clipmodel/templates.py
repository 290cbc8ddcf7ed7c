"""Prompt templates for zero-shot classification (torch-free: the ONNX runtime reads them too)."""
from __future__ import annotations

from pathlib import Path
from string import Formatter

# The bare class name: measured on real captions (names and tags, docs/real-data.md), where "a photo of
# a {}." and a CLIP-style ensemble both scored lower; prompts help when captions are sentences about photos.
DEFAULT_TEMPLATES = ("{}",)


def load_templates(path: str | Path) -> list[str]:
    """One template per line with a `{}` for the class name; blank lines and `#` comments skipped; a
    leading byte-order mark is not part of the first template.

    Raises: ValueError when the file holds no template or a malformed one (see `is_template`);
    OSError when it cannot be read; UnicodeDecodeError when it is not UTF-8.
    """
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    bad = [t for t in templates if not is_template(t)]
    if bad or not templates:
        raise ValueError(f"{path}: every template needs exactly one '{{}}' and no other braces (bad: {bad[:3]})")
    return templates


def is_template(text: str) -> bool:
    """Exactly one `{}` and no other replacement field (`{x}`, `{0}`, a lone brace), so that
    `text.format(name)` always works."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in Formatter().parse(text) if name is not None]
    except ValueError:  # an unmatched brace
        return False
    return fields == [("", "", None)]
