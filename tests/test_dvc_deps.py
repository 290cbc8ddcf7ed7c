"""dvc.yaml must list everything a stage reads, or `dvc repro` serves stale results.

For every stage of every pipeline (the root, efficiency/, real/, real/efficiency/), the modules its
`cmd` imports (the closure under clipmodel/ and pipeline/) must be deps, and the params it reads must
be in its params list. Reads are found statically, in every function of those modules: attributes
taken from a `Params` (or a section of it) bound by `load_params()`, by an argument annotated with
its class, or by assignment from one of those. A section handed to a function is followed through
that function's annotation; a method call on a section (`model_dump()`) reads all of it.

dvc.yaml is also the one place where the stages' paths live: each `cmd` names its inputs and outputs
as `--option path` (the stage's defaults are the root pipeline's paths, so `python -m pipeline.train`
alone does what `dvc repro train` does), and the paths a cmd names are exactly the stage's deps and
outs, each option either all inputs or all outputs.
"""
from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pipeline import params as schema

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ["dvc.yaml", "efficiency/dvc.yaml", "real/dvc.yaml", "real/efficiency/dvc.yaml"]
PACKAGES = ("clipmodel", "pipeline")
SPEED_ONLY = {"data.workers"}  # how many processes decode: never what a stage writes, so never a reason to rerun
# Keys a stage only checks before its work, for a stage after it, never shaping what it writes.
CHECKED_ONLY = {"pipeline.train": {"evaluate.datasets"}}  # that the held-out sets' files exist
SECTIONS = {cls.__name__: name for name, cls in ((n, f.annotation) for n, f in schema.Params.model_fields.items())}
SECTIONS["Params"] = ""


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def imports(name: str) -> set[str]:
    """Modules of this repo that `name` imports, anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(module_file(name).read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES and module_file(m)}


def closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imports(m) - seen
    return seen


def field_path(parts: list[str]) -> str | None:
    """The params key that an attribute chain reads, dotted: the longest prefix of `parts` naming a
    field ('' when none). None when the chain names a section and goes no further: the section is
    handed on, and the callee's annotated argument shows what it reads."""
    model, path = schema.Params, []
    for part in parts:
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        if part not in fields:
            return ".".join(path)
        path.append(part)
        model = fields[part].annotation
    return None if isinstance(model, type) and issubclass(model, BaseModel) else ".".join(path)


def attribute_chain(node: ast.AST) -> tuple[str, list[str]] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return (node.id, parts[::-1]) if isinstance(node, ast.Name) else None


def params_read(name: str) -> set[str]:
    """Dotted params keys that functions of module `name` read."""
    reads = set()
    for fn in ast.walk(ast.parse(module_file(name).read_text())):
        if not isinstance(fn, ast.FunctionDef):
            continue
        bound = {a.arg: SECTIONS[ann.id] for a in fn.args.args + fn.args.kwonlyargs
                 if isinstance(ann := a.annotation, ast.Name) and ann.id in SECTIONS}
        for node in ast.walk(fn):  # bindings: x = load_params()[.section], x = p.section
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                value, target = node.value, node.targets[0].id
                call = value.value if isinstance(value, ast.Attribute) else value
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "load_params":
                    bound[target] = value.attr if isinstance(value, ast.Attribute) else ""
                elif (chain := attribute_chain(value)) and chain[0] in bound:
                    parts = [*filter(None, bound[chain[0]].split(".")), *chain[1]]
                    if field_path(parts) is None:  # x = p.section: x is that section
                        bound[target] = ".".join(parts)
        inner = {id(n.value) for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and id(node) not in inner and (chain := attribute_chain(node)) \
                    and chain[0] in bound:
                path = field_path([*filter(None, bound[chain[0]].split(".")), *chain[1]])
                if path:
                    reads.add(path)
    return {r for r in reads if not any(r.startswith(o + ".") for o in reads)}  # a section read whole covers its keys


def stages() -> list:
    return [pytest.param(file, stage.get("do", stage), id=f"{file}:{name}") for file in PIPELINES
            for name, stage in yaml.safe_load((ROOT / file).read_text())["stages"].items()]


def has_key(values: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return False
        values = values[part]
    return True


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


@pytest.mark.parametrize("file, stage", stages())
def test_stage_lists_its_code_and_params(file, stage):
    wdir = (ROOT / file).parent / stage.get("wdir", ".")
    module = re.search(r"python -m (\S+)", stage["cmd"]).group(1)
    deps = [(wdir / d).resolve() for d in stage.get("deps", [])]
    modules = closure(module)
    missing = sorted(str(module_file(m).relative_to(ROOT)) for m in modules if not covered(module_file(m), deps))
    assert missing == [], f"{file}: {stage['cmd']}: deps miss {missing}"

    declared = [str(k) for k in stage.get("params", [])]
    values = yaml.safe_load((wdir / "params.yaml").read_text())
    absent = [k for k in declared if not has_key(values, k)]
    assert absent == [], f"{file}: {stage['cmd']}: {wdir / 'params.yaml'} lacks {absent}: DVC refuses to run it"
    reads = set().union(*(params_read(m) for m in modules))
    if module == "pipeline.efficiency" and "evaluate.datasets" in reads:  # probes() reads the sets its tasks name
        named = [t for t in values["efficiency"]["tasks"] if t in (values["evaluate"]["datasets"] or {})]
        reads = reads - {"evaluate.datasets"} | {f"evaluate.datasets.{t}" for t in named}
    reads = reads - SPEED_ONLY - CHECKED_ONLY.get(module, set())
    uncovered = sorted(r for r in reads if not any(r == d or r.startswith(d + ".") for d in declared))
    assert uncovered == [], f"{file}: {stage['cmd']}: params miss {uncovered}"


def test_the_analysis_sees_reads_and_imports():
    """The checks above are only as good as what they see: a known import and known reads."""
    assert "pipeline.loop" in closure("pipeline.train")
    assert "clipmodel.stream" in closure("pipeline.train")
    assert {"tokenize.vocab_size", "tokenize.caption_views"} <= params_read("pipeline.tokenize")  # x = load_params().s
    assert {"supervised.crop_scale", "train.epochs"} <= params_read("pipeline.supervised")  # p = load_params()
    assert {"train", "data.image_size"} <= params_read("pipeline.run")  # p.train.model_dump() reads it all
    assert {"data.seed", "data.source"} <= params_read("pipeline.tasks")  # an argument annotated DataParams
    assert "data" not in params_read("pipeline.evaluate")  # p.data handed to tasks_for is not read whole


def test_no_stage_imports_another_stage():
    """What stages share lives in small modules of its own, so a stage's code is its own file."""
    entry = {re.search(r"python -m (\S+)", p.values[1]["cmd"]).group(1) for p in stages()}
    assert {"pipeline.train", "pipeline.evaluate", "pipeline.efficiency_report"} <= entry
    tangled = {m: sorted(closure(m) & entry - {m}) for m in entry if closure(m) & entry - {m}}
    assert tangled == {}


# ---------------------------------------------------------------------------------------------
# paths: dvc.yaml's cmd names them, and they are the stage's deps and outs

def expanded_stages() -> list:
    """Every stage of every pipeline, a foreach stage once per item with ${item} substituted."""
    out = []
    for file in PIPELINES:
        for name, stage in yaml.safe_load((ROOT / file).read_text())["stages"].items():
            items = [(f"{name}@{item}", json.loads(json.dumps(stage["do"]).replace("${item}", str(item))))
                     for item in stage["foreach"]] if "foreach" in stage else [(name, stage)]
            out += [pytest.param(file, spec, id=f"{file}:{stage_id}") for stage_id, spec in items]
    return out


def cmd_args(cmd: str) -> tuple[str, list[str], dict[str, list[str]]]:
    """`python -m module words... --option value... ...` as (module, words, {option: values})."""
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "-m"], cmd
    module, rest = argv[2], argv[3:]
    words = []
    while rest and not rest[0].startswith("--"):
        words.append(rest.pop(0))
    options: dict[str, list[str]] = {}
    for token in rest:
        if token.startswith("--"):
            assert token not in options, f"{cmd}: {token} twice"
            options[token] = []
        else:
            options[list(options)[-1]].append(token)
    return module, words, options


def declared(stage: dict, wdir: Path) -> tuple[list[Path], list[Path]]:
    """(deps, outs: outs, metrics and plots), as normalised absolute paths."""
    def paths(entries) -> list[Path]:
        return [Path(os.path.normpath(wdir / str(next(iter(e)) if isinstance(e, dict) else e))) for e in entries or []]
    return paths(stage.get("deps")), [p for key in ("outs", "metrics", "plots") for p in paths(stage.get(key))]


def related(a: Path, b: Path) -> bool:
    """One is the other or lies inside it."""
    return a == b or a in b.parents or b in a.parents


def params_paths(values, wdir: Path) -> list[Path]:
    """The paths a params.yaml names (string values with a slash), relative to its folder."""
    if isinstance(values, dict):
        return [p for v in values.values() for p in params_paths(v, wdir)]
    if isinstance(values, list):
        return [p for v in values for p in params_paths(v, wdir)]
    return [Path(os.path.normpath(wdir / values))] if isinstance(values, str) and "/" in values else []


@pytest.mark.parametrize("file, stage", expanded_stages())
def test_cmd_names_exactly_the_stage_deps_and_outs(file, stage):
    """Each path of the cmd is a dep or an out (or lies inside one, or is the folder holding declared
    ones), never inside both; each dep and out is named by the cmd, or is code, params.yaml, or data that
    params.yaml names (a path it holds, or beside one: a CSV's images)."""
    wdir = Path(os.path.normpath((ROOT / file).parent / stage.get("wdir", ".")))
    _, words, options = cmd_args(stage["cmd"])
    deps, outs = declared(stage, wdir)
    assert options, f"{file}: {stage['cmd']}: names no path"
    assert not [w for w in words if "/" in w or "." in w], f"{file}: {stage['cmd']}: paths go in --options"
    named = []
    for option, values in options.items():
        assert values, f"{file}: {stage['cmd']}: {option} without a path"
        for value in values:
            path = Path(os.path.normpath(wdir / value))
            named.append(path)
            # A folder may hold both (models/ holds the weights read and onnx/ written); a path that is,
            # or lies inside, a dep must not also be or lie inside an out.
            within = [any(p == x or x in p.parents for x in xs) for p, xs in ((path, deps), (path, outs))]
            assert not all(within), f"{file}: {stage['cmd']}: {option} {value} is both a dep and an out"
            assert any(related(path, x) for x in deps + outs), \
                f"{file}: {stage['cmd']}: {option} {value} is neither a dep nor an out"
    code = [ROOT / package for package in PACKAGES]
    given = params_paths(yaml.safe_load((wdir / "params.yaml").read_text()), wdir)
    unnamed = [os.path.relpath(p, wdir) for p in deps + outs
               if not any(related(p, n) for n in named) and not any(c == p or c in p.parents for c in code)
               and p != wdir / "params.yaml" and not any(related(p, g) or g.parent in p.parents for g in given)]
    assert unnamed == [], f"{file}: {stage['cmd']}: declared but not named in the cmd: {unnamed}"


ROOT_PIPELINES = ["dvc.yaml", "efficiency/dvc.yaml"]  # wdir: the repo root, where the defaults point


@pytest.mark.parametrize("file, stage", [p for p in expanded_stages() if p.values[0] in ROOT_PIPELINES])
def test_root_cmd_passes_the_stage_defaults(file, stage):
    """`python -m pipeline.<stage>` alone (tests, benchmarks, a user at the prompt) does what DVC runs."""
    module, words, options = cmd_args(stage["cmd"])
    parse_args = importlib.import_module(module).parse_args
    assert parse_args(shlex.split(stage["cmd"])[3:]) == parse_args(words), f"{file}: {stage['cmd']}"
