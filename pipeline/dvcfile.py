"""What dvc.yaml declares, read without DVC: the stages in dependency order, the metrics files and
the uncached outputs, and the metrics those files hold, flattened to dotted keys. The Prefect
flows build one task per stage from it, so a stage added to dvc.yaml needs no change there."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

KEY_METRICS = re.compile(r"^(train\.final_loss|retrieval\.[^.]+\.r(1|5)|zero_shot\.[^.]+\.top1|"
                         r"linear_probe\.[^.]+\.top1|supervised\.[^.]+\.top1)$")


def _dvc_yaml(repo: Path) -> dict[str, dict]:
    return (yaml.safe_load((Path(repo) / "dvc.yaml").read_text()) or {}).get("stages", {}) or {}


def _paths(entries: Any, wdir: str) -> list[tuple[str, dict]]:
    """(path, options) of a deps/outs/metrics/plots list, relative to the repo root."""
    out = []
    for entry in entries or []:
        if isinstance(entry, dict):
            for path, opts in entry.items():
                out.append((os.path.normpath(os.path.join(wdir, path)), opts or {}))
        else:
            out.append((os.path.normpath(os.path.join(wdir, str(entry))), {}))
    return out


def _outs(spec: dict) -> list[tuple[str, dict]]:
    wdir = spec.get("wdir", ".")
    return [p for key in ("outs", "metrics", "plots") for p in _paths(spec.get(key), wdir)]


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def stage_names(repo: str | Path) -> list[str]:
    """The stages of dvc.yaml, each after the stages whose outputs it depends on (file order
    otherwise), so a stage added to dvc.yaml becomes a task without touching this module.

    Raises: ValueError when the stages' dependencies form a cycle."""
    stages = _dvc_yaml(Path(repo))
    outs = {name: [p for p, _ in _outs(spec)] for name, spec in stages.items()}
    needs = {name: {other for other in stages if other != name
                    for dep, _ in _paths(spec.get("deps"), spec.get("wdir", "."))
                    if any(_overlaps(dep, o) for o in outs[other])}
             for name, spec in stages.items()}
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and needs[n] <= set(order)]
        if not ready:
            raise ValueError(f"dvc.yaml: dependency cycle among {sorted(set(stages) - set(order))}")
        order.append(ready[0])
    return order


def metrics_files(repo: str | Path) -> list[str]:
    """The `metrics:` files every stage of dvc.yaml declares, relative to the repo root (whether or
    not they exist yet), in stage order."""
    return [p for spec in _dvc_yaml(Path(repo)).values() for p, _ in _paths(spec.get("metrics"),
                                                                               spec.get("wdir", "."))]


def uncached_outputs(repo: str | Path) -> list[str]:
    """Outputs with `cache: false` (metrics, plots, run.json): git-tracked in an experiment."""
    return [p for spec in _dvc_yaml(Path(repo)).values() for p, opts in _outs(spec)
            if opts.get("cache") is False]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level with dotted keys, as `dvc metrics show` and MLflow params name them."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def read_metrics(repo: str | Path) -> dict[str, float]:
    """Numeric metrics of every `metrics:` file in dvc.yaml, flattened to dotted keys.
    Keys of reports/metrics.json are kept as they are (`retrieval.image_to_text.r1`); other
    files are prefixed with their stem (`train.final_loss`)."""
    metrics: dict[str, float] = {}
    for rel in metrics_files(repo):
        path = Path(repo) / rel
        if not path.exists():
            continue
        data = yaml.safe_load(path.read_text())  # JSON is YAML
        stem = Path(rel).stem
        metrics.update({k: v for k, v in flatten(data, "" if stem == "metrics" else f"{stem}.").items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return metrics


def key_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The headline subset of `read_metrics` output that a sweep compares experiments by (KEY_METRICS:
    final loss, retrieval R@1/R@5, zero-shot, linear-probe and supervised top-1)."""
    return {k: v for k, v in metrics.items() if KEY_METRICS.match(k)}
