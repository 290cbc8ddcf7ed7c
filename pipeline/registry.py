"""MLflow model registry: log the ONNX encoders and the servable pyfunc into the pipeline's run and
promote by metric.

Three registered models per export: the two ONNX encoders (`clip-image-encoder`, `clip-text-encoder`)
and `clip`, the pyfunc of pipeline/serving.py that `mlflow models serve -m models:/clip@champion
--env-manager local` answers embedding and zero-shot requests with. Aliases, not the deprecated stages:
a new version becomes `champion` only when its main metric beats the current champion's, otherwise
`challenger`. Every version is tagged with the git
commit, the data fingerprint and its metrics, so the registry alone says where a model came from.
"""
from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import onnx
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from pipeline import serving, tracking

IMAGE_MODEL, TEXT_MODEL, PYFUNC_MODEL = "clip-image-encoder", "clip-text-encoder", "clip"
MODELS = (IMAGE_MODEL, TEXT_MODEL, PYFUNC_MODEL)  # registered together, always under one alias
ONNX_REQUIREMENTS = ("mlflow", "numpy", "onnx", "onnxruntime")  # what MLflow infers for an encoder's graph


def champion_value(client: MlflowClient, metric: str) -> float | None:
    """The metric of the current champion trio, or None when there is no intact trio to beat: no champion,
    a champion alias on some of the three models only (as in a store from before `clip` was registered),
    aliases on versions of different runs, or a non-finite value."""
    versions = []
    for name in MODELS:
        try:
            versions.append(client.get_model_version_by_alias(name, "champion"))
        except MlflowException:
            return None
    if len({v.tags.get("mlflow_run_id") for v in versions}) != 1 or metric not in versions[0].tags:
        return None
    value = float(versions[0].tags[metric])
    return value if math.isfinite(value) else None


def promotion_lock(uri: str) -> AbstractContextManager:
    """One promotion at a time into a SQLite store: without it two exports that finish together (the
    points of a concurrent sweep) both read the same champion and both claim the alias, the worse one
    possibly last. A tracking server gets no lock here: its clients may be on other hosts."""
    if uri.startswith("sqlite:///"):
        return FileLock(f"{uri.removeprefix('sqlite:///')}-promote.lock")
    return nullcontext()


def register(onnx_dir: Path, pixels: np.ndarray, tokens: np.ndarray, embeddings: dict[str, np.ndarray],
             metric: str, value: float, tags: dict[str, str]) -> dict[str, dict]:
    """Log both encoders and the pyfunc (each with a signature and input example) into the active run and
    register new versions of the three models, then `promote` them; returns {model name: {version,
    alias, previous_champion}}.

    `pixels` and `tokens` are the encoders' input examples and `embeddings` their outputs by model name
    (any dtype the graphs take); the pyfunc makes its own example."""
    versions = {}
    # mlflow checks each input example by loading the graph with the CUDA-first provider list the MLmodel
    # keeps for GPU consumers; on a CPU-only onnxruntime it warns twice that CUDA is missing, which says
    # nothing about the export. Its errors still show.
    onnx_logger = logging.getLogger("mlflow.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        for name, file, example in ((IMAGE_MODEL, "image_encoder.onnx", pixels),
                                    (TEXT_MODEL, "text_encoder.onnx", tokens)):
            info = tracking.mlflow.onnx.log_model(
                onnx.load(str(onnx_dir / file)), name=name.removeprefix("clip-").replace("-", "_"),
                registered_model_name=name, input_example=example,
                signature=infer_signature(example, embeddings[name]), save_as_external_data=False,
                pip_requirements=serving.pinned(ONNX_REQUIREMENTS))
            versions[name] = str(info.registered_model_version)
    finally:
        onnx_logger.setLevel(level)
    versions[PYFUNC_MODEL] = str(serving.log_model(onnx_dir, PYFUNC_MODEL, PYFUNC_MODEL).registered_model_version)
    return promote(versions, metric, value, tags)


def promote(versions: dict[str, str], metric: str, value: float, tags: dict[str, str]) -> dict[str, dict]:
    """Tag the new `versions` ({model name: version}, one per model in MODELS, from the active run) with
    `tags` and the metric, and give all three the same alias: `champion` when `value` beats the current
    champion trio's, else `challenger`, so `@champion` always names the models of one run. A non-finite
    metric never becomes champion. Aliases are set last: a failed log moves none of them. Promotions into
    one SQLite store take turns (`promotion_lock`)."""
    client = MlflowClient(tracking.tracking_uri())
    tags = {**tags, "mlflow_run_id": tags.get("mlflow_run_id") or tracking.mlflow.active_run().info.run_id}
    out = {}
    with promotion_lock(tracking.tracking_uri()):
        previous = champion_value(client, metric)
        wins = math.isfinite(value) and (previous is None or value > previous)
        alias = "champion" if wins else "challenger"
        for name, version in versions.items():
            for key, val in {**tags, metric: str(value)}.items():
                client.set_model_version_tag(name, version, key, val)
            client.set_registered_model_alias(name, alias, version)
            out[name] = {"version": version, "alias": alias, "previous_champion": previous}
    return out
