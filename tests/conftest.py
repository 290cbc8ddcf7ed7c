"""Shared fixtures: a tiny synthetic workspace built by the real ingest and tokenize stages."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import pipeline  # noqa: F401  (first: telemetry off before any test imports Prefect or MLflow)

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data": {"image_size": 32, "shard_images": 128, "workers": 1,
             "synthetic": {"num_images": 400, "holdout_fraction": 0.2, "max_objects": 3}},
    "tokenize": {"vocab_size": 300, "context_length": 16},
    "model": {"vision": "vit", "embed_dim": 16, "vision_width": 32, "vision_layers": 1, "vision_heads": 2,
              "vision_patch_size": 8, "text_width": 32, "text_layers": 1, "text_heads": 2},
    "train": {"epochs": 2, "batch_size": 32, "warmup_fraction": 0.1, "checkpoint_every": 1, "log_every": 1},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def write_params(workdir: Path, override: dict) -> None:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    (workdir / "params.yaml").write_text(yaml.safe_dump(merge(base, override), sort_keys=False))


def stage_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),  # keep the caller's
               MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}", MLFLOW_DISABLE_TELEMETRY="true",
               DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="2")
    return env


def run_stage(workdir: Path, module: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", f"pipeline.{module}"], cwd=workdir, env=stage_env(workdir),
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline.{module} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def kill_at_step(workdir: Path, step: int) -> None:
    """Start the train stage in `workdir` and SIGKILL it once its checkpoint has reached `step`.

    Raises AssertionError when training ends first or no checkpoint reaches `step` within 300 s."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train"], cwd=workdir, env=stage_env(workdir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline = workdir / "checkpoints" / "train.pt", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if torch.load(ckpt, weights_only=True)["step"] >= step:
                break
        except Exception:  # not written yet, or caught between write and rename
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training finished before it could be killed"
    assert not (workdir / "models" / "clip.safetensors").exists()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A workspace with params.yaml and the ingest + tokenize outputs of a tiny synthetic set."""
    workdir = tmp_path_factory.mktemp("tiny")
    write_params(workdir, TINY)
    run_stage(workdir, "ingest")
    run_stage(workdir, "tokenize")
    return workdir


@pytest.fixture
def workspace(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny workspace (data and params only)."""
    shutil.copytree(tiny_data / "data", tmp_path / "data")
    shutil.copy(tiny_data / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def git_copy(dest: Path, params_override: dict, stages: list[str] | None = None) -> Path:
    """The repo's working tree (tracked and unignored files, no outputs under reports/ or checkpoints/) as a
    fresh git repo with one commit; `stages`: keep only these stages of dvc.yaml."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file() and not name.startswith(("checkpoints/", "reports/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    write_params(dest, params_override)
    if stages:
        spec = yaml.safe_load((dest / "dvc.yaml").read_text())
        spec["stages"] = {k: v for k, v in spec["stages"].items() if k in stages}
        (dest / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "ci@example.com"],
                 ["config", "user.name", "ci"], ["add", "-A"], ["commit", "-qm", "copy"]):
        git(dest, *args)
    return dest


def git(repo: Path, *args: str, check: bool = True) -> str:
    """`git args` in `repo` with the stages' environment; its stdout."""
    return subprocess.run(["git", *args], cwd=repo, env=stage_env(repo), capture_output=True, text=True,
                          check=check).stdout


def dvc(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = stage_env(workdir)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` in dvc.yaml = this venv
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=workdir, env=env,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
