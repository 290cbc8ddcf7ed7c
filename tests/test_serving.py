"""`mlflow models serve -m models:/clip@champion` answers embedding and zero-shot requests as ClipRuntime does.

One real server per module: a tiny exported model registered by `registry.register` into a fresh SQLite
store, served by the mlflow CLI in a subprocess (killed by the fixture's finalizer), asked over HTTP.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from clipmodel.encoder import Encoder
from clipmodel.export import export_onnx
from clipmodel.runtime import ClipRuntime
from clipmodel.support import SUPPORT_FILE, Support
from pipeline import registry, serving, tracking
from test_export import build_model_folder

pytestmark = pytest.mark.slow

STARTUP_S = 180  # a loaded 2-core machine: importing mlflow and uvicorn takes tens of seconds
LABELS = ["red square", "blue circle", "green triangle", "yellow star"]
TEXTS = ["a red square", "two blue circles and a green triangle", "", "yellow " * 40]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (20, 200, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


IMAGES = [png(0, (32, 32)), png(1, (50, 20)), jpeg()]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def post(url: str, body: dict) -> tuple[int, dict]:
    """POST JSON to /invocations; (HTTP status, parsed JSON answer) whatever the status."""
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_for_ping(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer on {url}/ping within {STARTUP_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, ClipRuntime]]:
    """The server's base URL and the same exported model in process."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    models = build_model_folder(root / "models", "vit")
    enc = Encoder.load(models)  # a support set, as evaluate writes one: the request's support_weight has work to do
    Support(enc.images(IMAGES), enc.texts(LABELS[:3]), np.arange(3), 1.0, 0.05).save(models / SUPPORT_FILE)
    onnx_dir = export_onnx(models, root / "onnx")
    rt = ClipRuntime.load(onnx_dir)
    assert rt.support is not None
    pixels = np.zeros((2, rt.pre.image_size, rt.pre.image_size, 3), np.uint8)
    # The image encoder's example in whatever its graph takes: normalised float32 [N, 3, S, S] or uint8 pixels.
    example = pixels if rt.image.get_inputs()[0].type == "tensor(uint8)" else rt.pre.normalise(pixels)
    tokens = np.array([[1, 40, 41, 2] + [0] * 12, [1, 50, 2] + [0] * 13], dtype=np.int64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(tracking.tracking_uri())
        experiment = mlflow.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            versions = registry.register(onnx_dir, example, tokens,
                                         {registry.IMAGE_MODEL: rt.embed_pixels(pixels),
                                          registry.TEXT_MODEL: rt.embed_tokens(tokens)}, "m", 0.5, {})
    assert {v["alias"] for v in versions.values()} == {"champion"} and set(versions) == set(registry.MODELS)

    port, log = free_port(), root / "serve.log"
    bin_dir = str(Path(sys.executable).parent)  # uvicorn, which the mlflow CLI starts, lives beside it
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", "models:/clip@champion",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_ping(url, proc, log)
        yield url, rt
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the CLI and the uvicorn it started: their own session
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_embeddings_equal_the_runtimes(served):
    url, rt = served
    rows = [[b64(image), None] for image in IMAGES] + [[None, text] for text in TEXTS]
    status, answer = post(url, {"dataframe_split": {"columns": ["image", "text"], "data": rows}})
    assert status == 200, answer
    got = np.array([row["embedding"] for row in answer["predictions"]], np.float32)
    want = np.concatenate([rt.encode_images(IMAGES), rt.encode_texts(TEXTS)])
    assert got.shape == want.shape and cosines(got, want).min() >= 0.9999

    # dataframe_records with absent keys, image and text rows interleaved, a text-only frame
    status, answer = post(url, {"dataframe_records": [{"text": TEXTS[0]}, {"image": b64(IMAGES[1])}]})
    assert status == 200, answer
    got = np.array([row["embedding"] for row in answer["predictions"]], np.float32)
    assert cosines(got, np.stack([rt.encode_texts(TEXTS[:1])[0], rt.encode_images(IMAGES[1:2])[0]])).min() >= 0.9999
    status, answer = post(url, {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}})
    assert status == 200 and len(answer["predictions"]) == len(TEXTS)


def test_zero_shot_equals_the_runtimes(served):
    url, rt = served
    body = {"dataframe_split": {"columns": ["image"], "data": [[b64(image)] for image in IMAGES]},
            "params": {"labels": LABELS, "k": 3}}
    status, answer = post(url, body)
    assert status == 200, answer
    want = rt.classify(IMAGES, LABELS, k=3)
    for row, top in zip(answer["predictions"], want):
        assert row["labels"][0] == top[0][0] and len(row["labels"]) == 3
        assert np.allclose(row["probabilities"], [p for _, p in top], atol=1e-4)

    templates = ["a photo of a {}.", "a drawing of a {}"]
    status, answer = post(url, {**body, "params": {"labels": LABELS, "templates": templates, "k": 10}})
    assert status == 200, answer
    want = rt.classify(IMAGES, LABELS, templates, k=10)
    assert [row["labels"] for row in answer["predictions"]] == [[name for name, _ in top] for top in want]
    assert all(abs(sum(row["probabilities"]) - 1) < 1e-4 for row in answer["predictions"])  # k > C: all labels


def test_support_weight_per_request_as_the_clis(served):
    """support_weight 0 is the paper's zero-shot and 3 triples the support term, as --support-weight; the
    served model keeps its own weight for the next request."""
    url, rt = served
    body = {"dataframe_split": {"columns": ["image"], "data": [[b64(image)] for image in IMAGES]}}
    found = rt.support
    for weight, support in ((0, None), (3.0, found.with_weight(3.0)), (None, found)):
        params = {"labels": LABELS, "k": 4, **({} if weight is None else {"support_weight": weight})}
        status, answer = post(url, {**body, "params": params})
        assert status == 200, answer
        rt.support = support
        try:
            want = rt.classify(IMAGES, LABELS, k=4)
        finally:
            rt.support = found
        for row, top in zip(answer["predictions"], want):
            assert row["labels"] == [name for name, _ in top], weight
            assert np.allclose(row["probabilities"], [p for _, p in top], atol=1e-4), weight


@pytest.mark.parametrize(("body", "message"), [
    ({"dataframe_split": {"columns": ["image"], "data": [[b64(IMAGES[0])], ["not base64 at all!"]]}},
     "row 1: 'image' is not valid base64"),
    ({"dataframe_split": {"columns": ["image"], "data": [[b64(b"just some text")]]}},
     "row 0: 'image' is not a usable image (not_an_image"),
    ({"dataframe_split": {"columns": ["image"], "data": [[b64(IMAGES[0])], [b64(IMAGES[1][:100])]]},
      "params": {"labels": LABELS}}, "row 1: 'image' is not a usable image"),
    ({"dataframe_records": [{"text": "a"}, {"caption": "b"}]}, "row 1: has neither 'image' nor 'text'"),
    ({"dataframe_records": [{"caption": "b"}]}, "needs an 'image' column"),
    ({"dataframe_records": [{"image": b64(IMAGES[0]), "text": "a"}]}, "row 0: has both 'image' and 'text'"),
    ({"dataframe_records": [{"text": "a"}], "params": {"labels": LABELS}}, "row 0: zero-shot"),
    ({"dataframe_records": [{"image": b64(IMAGES[0])}], "params": {"labels": LABELS, "templates": ["no slot"]}},
     "params 'templates'"),
    ({"dataframe_records": [{"image": b64(IMAGES[0])}], "params": {"labels": LABELS, "support_weight": -1}},
     "params 'support_weight' must be a finite number >= 0"),
])
def test_bad_input_is_a_client_error_naming_the_problem(served, body, message):
    status, answer = post(served[0], body)
    assert status == 400, answer
    assert message in answer["message"]
