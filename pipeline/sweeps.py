"""Sweep grids for the Prefect flows (pipeline/flows.py), with no Prefect in it: the sweep file, its
expansion into points, `--set key=value` arguments, and the table of results."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml

from pipeline.dvcfile import KEY_METRICS

Overrides = dict[str, Any]


def expand_grid(grid: dict[str, Any] | list[dict[str, Any]]) -> list[Overrides]:
    """{key: [values]} -> the Cartesian product (a scalar is one value); a list of override
    dicts is used as given."""
    if isinstance(grid, list):
        return [dict(point) for point in grid]
    keys = list(grid)
    values = [v if isinstance(v, list) else [v] for v in grid.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def load_grid(path: str | Path, repo: str | Path) -> dict | list:
    """A sweep file (YAML or JSON), unexpanded: {key: [values]} or a list of override dicts. A relative
    path missing from the current directory is looked up in `repo`.

    Raises: ValueError when the file holds neither, or is empty.
    """
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = Path(repo) / path
    grid = yaml.safe_load(path.read_text())  # YAML or JSON
    if not isinstance(grid, (dict, list)) or not grid:
        raise ValueError(f"{path}: expected {{key: [values]}} or a list of {{key: value}} dicts")
    return grid


def parse_sets(sets: list[str]) -> Overrides:
    """`--set key=value` arguments as overrides; values stay strings, for DVC's `-S` grammar to parse.

    Raises: SystemExit (one line) for an item without `=` or with an empty key.
    """
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected key=value")
        out[key.strip()] = value  # a string: parsed by DVC's -S grammar, as `dvc exp run -S`
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the sweep: one column per experiment, one line per setting and key
    metric (there are more metrics than experiments, so this stays readable)."""
    keys = sorted({k for row in rows for k in row if KEY_METRICS.match(k)})
    overrides = sorted({k for row in rows for k in row.get("overrides", {})})

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = [["", *(row["experiment"] for row in rows)], ["status", *(row.get("status", "") for row in rows)]]
    lines += [[k, *(cell(row.get("overrides", {}).get(k)) for row in rows)] for k in overrides]
    lines += [[k, *(cell(row.get(k)) for row in rows)] for k in keys]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
