"""What the evaluate and export stages both score: the templates file and the held-out labelled sets
of `evaluate.datasets`, loaded and checked before any model work, every problem one line naming its key.

    python -m pipeline.evaluation_sets

checks them as evaluate will (no image is opened) and prints one line per set: train runs it before
it trains, so that a missing file or a label outside the class list costs seconds, not a training.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from clipmodel.evaluation import DatasetError, LabelledSet
from clipmodel.templates import DEFAULT_TEMPLATES, is_template
from pipeline.params import EvaluateParams, load_params


def templates_of(table: dict[str, list[str]], key: str | None, where: str) -> list[str]:
    """A named list of the templates file (DEFAULT_TEMPLATES for None).

    Raises: SystemExit (one line naming the key) when the file has no such list."""
    if key is None:
        return list(DEFAULT_TEMPLATES)
    if key not in table:
        raise SystemExit(f"evaluate: {where} names templates {key!r}, which the templates file does not have "
                         f"(it has: {', '.join(table)})")
    return table[key]


def held_out_sets(ev: EvaluateParams, table: dict[str, list[str]]) -> list[tuple[LabelledSet, list[str]]]:
    """evaluate.datasets, loaded and checked before any model work.

    Raises: SystemExit (one line naming the set) when a set cannot be read or its labels miss its classes."""
    sets = []
    for name, spec in ev.datasets.items():
        try:
            ds = LabelledSet.load(spec.path, spec.classnames, name)
        except DatasetError as e:
            raise SystemExit(f"evaluate: evaluate.datasets.{name}: {e}") from None
        sets.append((ds, templates_of(table, spec.templates, f"evaluate.datasets.{name}")))
    return sets


def read_templates(path: str | Path) -> dict[str, list[str]]:
    """The templates YAML (key -> list of templates with one `{}` each).

    Raises: SystemExit (one line naming the file) when it is unreadable or a template is malformed."""
    try:
        table = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SystemExit(f"evaluate: templates file {path}: {e}".replace("\n", " ")) from None
    if not isinstance(table, dict):
        raise SystemExit(f"evaluate: templates file {path}: expected a mapping of key -> list of templates")
    bad = [k for k, v in table.items() if not isinstance(v, list) or not v or any(not is_template(str(t)) for t in v)]
    if bad:
        raise SystemExit(f"evaluate: templates file {path}: each key needs a list of templates with one '{{}}' "
                         f"(bad: {', '.join(map(str, bad))})")
    return table


def main() -> None:
    """Check params.yaml's held-out sets and templates. Raises: SystemExit (one line) as `held_out_sets`."""
    ev = load_params().evaluate
    for ds, templates in held_out_sets(ev, read_templates(ev.templates)):
        print(f"{ds.name}: {len(ds.images)} images, {len(ds.classnames)} classes, {len(templates)} templates")


if __name__ == "__main__":
    main()
