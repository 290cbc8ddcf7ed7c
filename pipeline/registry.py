"""MLflow model registry: log the ONNX encoders into the pipeline's run and promote by metric.

Aliases, not the deprecated stages: a new version becomes `champion` only when its main metric
beats the current champion's, otherwise `challenger`. Every version is tagged with the git
commit, the data fingerprint and its metrics, so the registry alone says where a model came from.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from pipeline import tracking

IMAGE_MODEL, TEXT_MODEL = "clip-image-encoder", "clip-text-encoder"


def champion_value(client: MlflowClient, name: str, metric: str) -> float | None:
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    value = version.tags.get(metric)
    return float(value) if value is not None else None


def register(onnx_dir: Path, pixels: np.ndarray, tokens: np.ndarray, embeddings: dict[str, np.ndarray],
             metric: str, value: float, tags: dict[str, str]) -> dict[str, dict]:
    """Log both encoders (signature and input example) into the active run and register new versions."""
    client = MlflowClient(tracking.tracking_uri())
    out = {}
    for name, file, example in ((IMAGE_MODEL, "image_encoder.onnx", pixels), (TEXT_MODEL, "text_encoder.onnx", tokens)):
        previous = champion_value(client, name, metric)
        info = tracking.mlflow.onnx.log_model(
            onnx.load(str(onnx_dir / file)), name=name.removeprefix("clip-").replace("-", "_"),
            registered_model_name=name, input_example=example,
            signature=infer_signature(example, embeddings[name]), save_as_external_data=False)
        version = str(info.registered_model_version)
        for key, val in {**tags, metric: str(value)}.items():
            client.set_model_version_tag(name, version, key, val)
        alias = "champion" if previous is None or value > previous else "challenger"
        client.set_registered_model_alias(name, alias, version)
        out[name] = {"version": version, "alias": alias, "previous_champion": previous}
    return out
