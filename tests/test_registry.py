"""MLflow registry: versions, champion/challenger aliases shared by the three models, and loading
models:/…@champion."""
from __future__ import annotations

import threading
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pytest

from clipmodel.export import export_onnx
from clipmodel.runtime import ClipRuntime
from pipeline import registry, tracking
from test_export import build_model_folder


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return export_onnx(build_model_folder(root / "models", "vit"), root / "onnx")


@pytest.fixture
def store(onnx_dir, tmp_path, monkeypatch):
    """A fresh MLflow store, and example inputs with the encoders' outputs to register."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    rt = ClipRuntime.load(onnx_dir)
    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    tokens = np.array([[1, 40, 41, 2] + [0] * 12, [1, 50, 2] + [0] * 13], dtype=np.int64)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    return pixels, tokens, {registry.IMAGE_MODEL: rt.image.run(None, {"pixels": pixels})[0],
                            registry.TEXT_MODEL: rt.text.run(None, {"tokens": tokens})[0]}


def test_champion_moves_only_when_the_metric_improves(onnx_dir, store):
    pixels, tokens, outputs = store
    results = []
    for value in (0.5, 0.4, 0.7):  # first, a worse one, a better one
        with mlflow.start_run():
            results.append(registry.register(onnx_dir, pixels, tokens, outputs, "zero_shot.shape.top1", value,
                                             {"git_commit": "abc", "data_fingerprint": "fp"}))
    aliases = [r[registry.IMAGE_MODEL]["alias"] for r in results]
    assert aliases == ["champion", "challenger", "champion"]
    assert all(len({r[name]["alias"] for name in registry.MODELS}) == 1 for r in results)  # one alias per export
    client = mlflow.MlflowClient()
    for name in registry.MODELS:
        champion = client.get_model_version_by_alias(name, "champion")
        assert str(champion.version) == "3" and champion.tags["zero_shot.shape.top1"] == "0.7"
        assert champion.tags["git_commit"] == "abc" and champion.tags["data_fingerprint"] == "fp"
        assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"

    model = mlflow.onnx.load_model(f"models:/{registry.IMAGE_MODEL}@champion")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixels": pixels})[0]
    assert np.allclose(got, outputs[registry.IMAGE_MODEL], atol=1e-6)


def test_champion_is_always_a_pair_of_one_run_and_never_non_finite(store):
    client = mlflow.MlflowClient()

    def register(value: float) -> str:
        """A run's three new versions (artifact-less: the aliasing is under test, not the logging above)."""
        with mlflow.start_run() as run:
            versions = {}
            for name in registry.MODELS:
                if not client.search_registered_models(f"name = '{name}'"):
                    client.create_registered_model(name)
                versions[name] = client.create_model_version(name, f"runs:/{run.info.run_id}/model",
                                                             run.info.run_id).version
            registry.promote(versions, "m", value, {"mlflow_run_id": run.info.run_id})
            return run.info.run_id

    def champion_runs() -> set[str]:
        return {client.get_model_version_by_alias(n, "champion").tags["mlflow_run_id"]
                for n in registry.MODELS}

    register(float("nan"))
    with pytest.raises(mlflow.exceptions.MlflowException):  # a NaN first is challenger, not champion
        client.get_model_version_by_alias(registry.IMAGE_MODEL, "champion")
    first = register(0.5)
    assert champion_runs() == {first}
    register(0.6)
    client.delete_model_version(registry.TEXT_MODEL, "3")  # the text half of the 0.6 champion
    third = register(0.55)  # no intact pair to beat: this run's pair becomes champion, both towers
    assert champion_runs() == {third}
    fourth = register(0.9)
    register(float("nan"))
    assert champion_runs() == {fourth}


def test_promotions_into_one_store_take_turns(store, tmp_path):
    """While another export holds the store's promotion lock, a promotion neither reads the champion nor
    moves an alias; it goes on when the lock is released (the points of a concurrent sweep)."""
    client = mlflow.MlflowClient()
    with mlflow.start_run() as run:
        versions = {}
        for name in registry.MODELS:
            client.create_registered_model(name)
            versions[name] = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version
    lock = registry.promotion_lock(tracking.tracking_uri())
    assert str(tmp_path) in lock.lock_file
    with lock:
        promoting = threading.Thread(target=registry.promote,
                                     args=(versions, "m", 0.5, {"mlflow_run_id": run.info.run_id}))
        promoting.start()
        promoting.join(timeout=2)
        assert promoting.is_alive()
        assert not client.get_registered_model(registry.IMAGE_MODEL).aliases
    promoting.join(timeout=30)
    assert not promoting.is_alive()
    assert client.get_model_version_by_alias(registry.IMAGE_MODEL, "champion").version == versions[registry.IMAGE_MODEL]


def test_export_logs_no_missing_cuda_warning_yet_keeps_cuda_first_for_gpu_consumers(onnx_dir, store):
    """mlflow's input-example check loads each graph with the CUDA-first providers the MLmodel declares;
    on a CPU-only onnxruntime that warned twice per export, about nothing the export did."""
    import logging

    pixels, tokens, outputs = store
    seen: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: seen.append(record.getMessage())
    onnx_logger = logging.getLogger("mlflow.onnx")
    onnx_logger.addHandler(handler)
    try:
        with mlflow.start_run():
            registry.register(onnx_dir, pixels, tokens, outputs, "zero_shot.shape.top1", 0.5, {})
        assert not [m for m in seen if "unavailable" in m], seen
        assert onnx_logger.level == logging.NOTSET  # restored
    finally:
        onnx_logger.removeHandler(handler)
    flavor = mlflow.models.Model.load(f"models:/{registry.IMAGE_MODEL}/1").flavors["onnx"]
    assert flavor["providers"][0] == "CUDAExecutionProvider"


def test_encoders_carry_the_requirements_mlflow_would_infer(onnx_dir, store, tmp_path):
    """The encoders' requirements are given, not inferred (inference loads each graph in a subprocess):
    they must be the file MLflow writes when it infers them."""
    import onnx

    pixels, tokens, outputs = store
    with mlflow.start_run():
        registry.register(onnx_dir, pixels, tokens, outputs, "zero_shot.shape.top1", 0.5, {})
    for name, file in ((registry.IMAGE_MODEL, "image_encoder.onnx"), (registry.TEXT_MODEL, "text_encoder.onnx")):
        mlflow.onnx.save_model(onnx.load(str(onnx_dir / file)), tmp_path / name / "inferred")
        logged = mlflow.artifacts.download_artifacts(f"models:/{name}/latest", dst_path=str(tmp_path / name / "logged"))
        assert (Path(logged) / "requirements.txt").read_text() == (tmp_path / name / "inferred/requirements.txt").read_text()
