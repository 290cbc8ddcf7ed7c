"""An MLflow pyfunc over the exported ONNX folder, so `mlflow models serve` answers CLIP requests.

The model's one artifact is the exported folder (models/onnx: both encoders, tokenizer.json,
preprocess.json, and whatever else export writes there), opened with the torch-free
`clipmodel.runtime.ClipRuntime`, which does its own image and text preprocessing. Only the runtime's
public API is used: `load`, `encode_images`, `encode_texts`, `classify`, `support`.

Input: a pandas DataFrame (over HTTP: JSON `dataframe_split` or `dataframe_records`) with an `image`
column (base64 of an image file's bytes: PNG, JPEG, ...) and/or a `text` column.

- No `labels` param: one embedding per row; each row holds an image or a text, not both. Output
  column `embedding`: float32 values, L2-normalised, embed_dim of them (JSON: a list of floats).
- `labels` param (a list of class names): zero-shot; every row holds an image. Output columns
  `labels` (the min(k, C) most probable names, best first) and `probabilities` (softmax over all
  labels, same order). Params `templates` (prompts with one `{}`; empty: the runtime's default), `k`,
  and `support_weight` (the support set's weight, as the CLIs' --support-weight; 0: the paper's
  zero-shot; unset: the weight export saved).

Bad input raises `MlflowException` (INVALID_PARAMETER_VALUE: HTTP 400 from the scoring server) naming
the row (0-based, in request order) and the problem.

    mlflow models serve -m models:/clip@champion --env-manager local -h 127.0.0.1 -p 5001

The model imports this module and `clipmodel`, so it is served from the environment the project is
installed in (`--env-manager local`); its pip requirements list the third-party packages only.
"""
from __future__ import annotations

import base64
import binascii
import copy
import io
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import ParamSchema, ParamSpec
from PIL import Image

from clipmodel.images import ImageError
from clipmodel.runtime import ClipRuntime
from clipmodel.support import reweighted

IMAGE, TEXT = "image", "text"
ARTIFACT = "onnx"  # the key of the exported folder in context.artifacts
MODEL_CODE = Path(__file__).with_name("serving_model.py")  # what log_model logs: sets ClipModel as the model
# Written by hand: infer_signature gives an empty list's default the type datetime. An empty `labels`
# means "embed", an empty `templates` means the runtime's default prompts.
PARAMS = ParamSchema([ParamSpec("labels", "string", [], (-1,)), ParamSpec("templates", "string", [], (-1,)),
                      ParamSpec("k", "long", 5), ParamSpec("support_weight", "double", None)])
T = TypeVar("T")
REQUIREMENTS = ("mlflow", "onnxruntime", "tokenizers", "pillow", "numpy", "pandas", "psutil")


def bad_input(message: str) -> MlflowException:
    """The error for a request the model cannot answer (HTTP 400 from the scoring server)."""
    return MlflowException.invalid_parameter_value(message)


def _present(value: object) -> bool:
    """False for the cell a JSON null or a missing key becomes (None or NaN)."""
    return value is not None and not (isinstance(value, float) and value != value)


def decode_image(row: int, value: object) -> bytes:
    """The image file bytes of a base64 cell; whitespace and a `data:...;base64,` prefix are allowed.

    Raises: MlflowException naming `row` when the value is not a string or not valid base64."""
    if not isinstance(value, str):
        raise bad_input(f"row {row}: 'image' must be a base64 string, got {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_input(f"row {row}: 'image' is not valid base64 ({e})") from None


def _cells(frame: pd.DataFrame, column: str) -> list[object]:
    return frame[column].tolist() if column in frame.columns else [None] * len(frame)


def _encode_or_name_row(encode: Callable[[list[bytes]], T], rows: list[int], images: list[bytes]) -> T:
    """`encode(images)`; when one image cannot be decoded, an error naming its row instead of the
    runtime's ImageError (which cannot name bytes). Raises: MlflowException."""
    try:
        return encode(images)
    except ImageError as e:
        error = e
    for row, image in zip(rows, images):  # only on failure: find the first bad image
        try:
            encode([image])
        except ImageError as e:
            raise bad_input(f"row {row}: 'image' is not a usable image ({e})") from None
    raise bad_input(f"an image could not be decoded ({error})")  # only if decoding is not deterministic


def _check_templates(templates: list[str]) -> None:
    bad = [t for t in templates if t.count("{}") != 1 or "{" in t.replace("{}", "") or "}" in t.replace("{}", "")]
    if bad:
        raise bad_input(f"params 'templates': each needs exactly one '{{}}' and no other braces (bad: {bad[:3]})")


def predict_frame(runtime: ClipRuntime, frame: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
    """Answer one request with `runtime` (see the module docstring for the columns and params).

    Returns one output row per input row: column `embedding` (list of embed_dim floats, unit L2 norm),
    or with `labels` given, columns `labels` (list of min(k, C) str) and `probabilities` (list of floats).

    Raises: MlflowException (INVALID_PARAMETER_VALUE) naming the row for undecodable base64 or image, a
    row with neither column (or with both, when embedding; or with no image, in zero-shot), a non-string
    cell; and for a frame with neither column, k < 1 or a malformed template.
    """
    params = params or {}
    labels = list(params.get("labels") or [])
    if IMAGE not in frame.columns and TEXT not in frame.columns:
        raise bad_input(f"the input needs an '{IMAGE}' column (base64 image file bytes) or a '{TEXT}' column "
                        "(other columns are ignored)")
    images, texts = _cells(frame, IMAGE), _cells(frame, TEXT)
    if labels:
        return _zero_shot(runtime, images, texts, labels, params)

    image_rows, text_rows = [], []
    for row, (image, text) in enumerate(zip(images, texts)):
        if _present(image) and _present(text):
            raise bad_input(f"row {row}: has both 'image' and 'text'; send one per row")
        if _present(image):
            image_rows.append(row)
        elif _present(text):
            if not isinstance(text, str):
                raise bad_input(f"row {row}: 'text' must be a string, got {type(text).__name__}")
            text_rows.append(row)
        else:
            raise bad_input(f"row {row}: has neither 'image' nor 'text'")
    embeddings: list[list[float] | None] = [None] * len(frame)
    if image_rows:
        blobs = [decode_image(row, images[row]) for row in image_rows]
        for row, vector in zip(image_rows, _encode_or_name_row(runtime.encode_images, image_rows, blobs)):
            embeddings[row] = vector.tolist()
    if text_rows:
        for row, vector in zip(text_rows, runtime.encode_texts([texts[row] for row in text_rows])):
            embeddings[row] = vector.tolist()
    return pd.DataFrame({"embedding": embeddings})


def _zero_shot(runtime: ClipRuntime, images: list[object], texts: list[object], labels: list[str],
               params: dict[str, Any]) -> pd.DataFrame:
    k = int(params.get("k", 5))
    if k < 1:
        raise bad_input(f"params 'k' must be at least 1, got {k}")
    templates = list(params.get("templates") or [])
    _check_templates(templates)
    for row, (image, text) in enumerate(zip(images, texts)):
        if not _present(image):
            raise bad_input(f"row {row}: zero-shot (params 'labels' given) needs an 'image' in every row")
        if _present(text):
            raise bad_input(f"row {row}: zero-shot classifies images; leave 'text' empty (labels go in params)")
    blobs = [decode_image(row, image) for row, image in enumerate(images)]
    runtime = _reweighted(runtime, params.get("support_weight"))

    def classify(batch: list[bytes]) -> list[list[tuple[str, float]]]:
        return (runtime.classify(batch, labels, templates, k) if templates else
                runtime.classify(batch, labels, k=k))

    ranked = _encode_or_name_row(classify, list(range(len(blobs))), blobs) if blobs else []
    return pd.DataFrame({"labels": [[name for name, _ in top] for top in ranked],
                         "probabilities": [[p for _, p in top] for top in ranked]})


def _reweighted(runtime: ClipRuntime, weight: float | None) -> ClipRuntime:
    """`runtime`, or a shallow copy (the same sessions) whose support set has `weight`
    (`clipmodel.support.reweighted`): the served runtime itself is never changed, since requests may
    run at the same time."""
    if weight is None:
        return runtime
    copied = copy.copy(runtime)
    try:
        copied.support = reweighted(runtime.support, weight, "params 'support_weight'", "this model")
    except ValueError as e:
        raise bad_input(str(e)) from None
    return copied


class ClipModel(mlflow.pyfunc.PythonModel):
    """The pyfunc `mlflow models serve` loads: `ClipRuntime` over the logged folder (artifact `onnx`)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.runtime = ClipRuntime.load(context.artifacts[ARTIFACT])

    def predict(self, context: mlflow.pyfunc.PythonModelContext | None, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """See `predict_frame`."""
        return predict_frame(self.runtime, model_input, params)


def example_image() -> str:
    """A small PNG (a red square on white, 24x24), base64-encoded: the input example's image."""
    image = Image.new("RGB", (24, 24), (255, 255, 255))
    image.paste((220, 30, 30), (6, 6, 18, 18))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_example() -> pd.DataFrame:
    """Two rows: an image to embed and a text to embed."""
    return pd.DataFrame({IMAGE: [example_image(), None], TEXT: [None, "a red square"]})


def signature(runtime: ClipRuntime) -> ModelSignature:
    """Inputs and outputs inferred from the input example and this model's real answers in both modes
    (so every output column is optional); params as `PARAMS`."""
    example = input_example()
    embedded = predict_frame(runtime, example)
    classified = predict_frame(runtime, example[[IMAGE]].iloc[:1], {"labels": ["red square", "blue circle"], "k": 2})
    inferred = infer_signature(example, pd.concat([embedded, classified], ignore_index=True))
    return ModelSignature(inferred.inputs, inferred.outputs, PARAMS)


def log_model(onnx_dir: Path, name: str, registered_model_name: str) -> ModelInfo:
    """Log the pyfunc into the active run with `onnx_dir` (the whole folder) as its artifact, a
    signature and an input example, and register it as a new version of `registered_model_name`.
    The model is logged as code (MODEL_CODE), not pickled: loading it executes no pickle.

    Raises: FileNotFoundError when `onnx_dir` is not an exported model folder (from `ClipRuntime.load`)."""
    runtime = ClipRuntime.load(onnx_dir)
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(MODEL_CODE), artifacts={ARTIFACT: str(Path(onnx_dir).resolve())},
        signature=signature(runtime), input_example=input_example(), registered_model_name=registered_model_name,
        pip_requirements=pinned(REQUIREMENTS))


def pinned(packages: tuple[str, ...]) -> list[str]:
    """`package==version` of each, as installed here: a logged model's pip requirements, given so that
    MLflow does not infer them (it would load the model in a subprocess, about 2.5 s per model)."""
    return [f"{package}=={version(package)}" for package in packages]
