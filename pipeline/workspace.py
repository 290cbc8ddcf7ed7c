"""Git and DVC plumbing for the Prefect flows (pipeline/flows.py), with no Prefect in it: the
stages' environment, experiment names, and the shared clones that concurrent sweep points run in."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline import TELEMETRY_OFF



def subprocess_env(repo: str | Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ with telemetry off, this venv first on PATH (so `dvc` and the stages' `python`
    are the flow's), unbuffered output, sparse tqdm updates, and an explicit MLflow store."""
    env = dict(os.environ)
    env.update(TELEMETRY_OFF)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TQDM_MININTERVAL", "10")  # one progress line per 10 s in the logs, not per step
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(repo).resolve() / 'mlflow.db'}")
    env.update(extra or {})
    return env


def git(repo: str | Path, *args: str) -> str:
    """`git <args>` run in `repo`: its stdout, stripped.

    Raises: subprocess.CalledProcessError (stderr captured on it) when git exits non-zero.
    """
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


def dvc(*args: str) -> list[str]:
    """The argv of `dvc <args>` via this interpreter (`python -m dvc`): the flow's own DVC, whatever PATH holds."""
    return [sys.executable, "-m", "dvc", *args]


def check_fresh_name(repo: str | Path, name: str) -> None:
    """Fail before any work if `dvc exp save -n name` would fail at the end of the run.

    Raises: ValueError when the name is not a safe ref name (letters, digits, '.', '_', '-'; no '..',
    no trailing '.' or '.lock') or an experiment of that name exists in `repo` already.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or ".." in name or name.endswith((".", ".lock")):
        raise ValueError(f"experiment name {name!r}: use letters, digits, '.', '_' and '-'")
    refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").splitlines()
    if any(ref.rsplit("/", 1)[-1] == name for ref in refs if "/exec/" not in ref):
        raise ValueError(f"experiment {name!r} exists already (dvc exp remove {name}, or pick another name)")


def hydra_value(value: Any) -> str:
    """A Python value in `dvc exp run -S` (Hydra override) syntax; strings are passed verbatim."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def clone(folder: Path) -> tuple[Path, Path]:
    """A `git clone --shared` of the repo that holds `folder` (a pipeline folder such as real/ may be
    below its root), with its uncommitted changes, DVC cache and MLflow store: the clone's root, to
    remove when done, and its copy of `folder`.

    The clone is a hidden sibling of the repo (`../.<repo>-exp-XXXX`), so that a relative path leading
    out of the repo (real/'s `../../shared/real-emoji`) names the same files from the clone."""
    repo = Path(git(folder, "rev-parse", "--show-toplevel"))
    work = Path(tempfile.mkdtemp(prefix=f".{repo.name}-exp-", dir=repo.parent))
    try:
        _populate_clone(repo, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return work, work / Path(folder).resolve().relative_to(repo)


def _populate_clone(repo: Path, work: Path) -> None:
    git(repo, "clone", "--quiet", "--shared", str(repo), str(work))
    git(work, "checkout", "--quiet", "--detach", git(repo, "rev-parse", "HEAD"))
    changed = git(repo, "ls-files", "--modified", "--others", "--exclude-standard", "-z").split("\0")
    for rel in filter(None, changed):
        src = repo / rel
        if src.is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / rel)
    for rel in filter(None, git(repo, "ls-files", "--deleted", "-z").split("\0")):
        (work / rel).unlink(missing_ok=True)
    cache = subprocess.run(dvc("cache", "dir"), cwd=repo, env=subprocess_env(repo), check=True,
                           capture_output=True, text=True).stdout.strip()
    subprocess.run(dvc("config", "--local", "cache.dir", cache), cwd=work, env=subprocess_env(repo),
                   check=True, capture_output=True)


def fetch_experiment(repo: Path, work: Path, name: str) -> None:
    """Copy experiment `name`'s refs (refs/exps/...) from the clone whose root is `work` into the repo
    holding `repo`, before the clone is removed; an existing ref of the same name is overwritten.

    Raises: subprocess.CalledProcessError when git fails.
    """
    refs = [r for r in git(work, "for-each-ref", "--format=%(refname)", "refs/exps").splitlines()
            if r.rsplit("/", 1)[-1] == name]
    for ref in refs:
        git(repo, "fetch", "--quiet", str(work), f"+{ref}:{ref}")
