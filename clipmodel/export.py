"""From a trained model folder to the torch-free runtime's folder: two ONNX encoders plus what encoding needs.

Each encoder graph ends in the L2 normalisation, so a consumer only ever takes dot products. What the
graphs cannot carry (pixel decoding, resizing, normalisation constants, the tokenizer, the temperature)
goes beside them in preprocess.json and tokenizer.json, read by `clipmodel.runtime`.

    python -m clipmodel.export --model models --out models/onnx [--int8 models/onnx-int8 --data data]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import PIL
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from onnx_ir.passes.common import NameFixPass
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from tokenizers import Tokenizer
from torch import nn

from clipmodel.checkpoint import load_model
from clipmodel.data import Corpus, to_tensor
from clipmodel.io import atomic_path
from clipmodel.model import CLIP
from clipmodel.model_card import IMAGE_STEPS, TEXT_STEPS, format_line, model_card
from clipmodel.runtime import ClipRuntime, Preprocess
from clipmodel.support import SUPPORT_FILE, Support
from clipmodel.templates import DEFAULT_TEMPLATES
from clipmodel.tokenizer import EOT, PAD, SOT, context_length, encode, load_tokenizer, trim_padding

IMAGE_ONNX, TEXT_ONNX, PREPROCESS_JSON, TOKENIZER_JSON, MODEL_CARD = (
    "image_encoder.onnx", "text_encoder.onnx", "preprocess.json", "tokenizer.json", "MODEL.md")
CALIBRATION_IMAGES = 512  # train images (and one caption each) that calibrate int8's activation scales

class _Encoder(nn.Module):
    """One tower of `model` with the final L2 normalisation: a graph with one input and one output.
    The model is a submodule, so its weights keep their state-dict names in the graph."""

    def __init__(self, model: CLIP, tower: Literal["image", "text"]):
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(x) if self.tower == "image" else self.model.encode_text(x)
        return F.normalize(features, dim=-1)


def _export(module: nn.Module, example: torch.Tensor, input_name: str, path: Path, opset: int,
            dims: dict[int, torch.export.Dim]) -> None:
    program = torch.onnx.export(module.eval(), (example,), input_names=[input_name], output_names=["embedding"],
                                dynamic_shapes={"x": dims}, opset_version=opset, dynamo=True, verbose=False)
    # The exporter names values after their op, so the text graph already has an "embedding" (the token
    # lookup) when the output takes that name: an invalid graph (pytorch/pytorch#158094). NameFixPass
    # renames the intermediate and leaves graph inputs and outputs alone.
    NameFixPass()(program.model)
    # Weights stay inside the .onnx: one self-contained file per encoder, which the quantiser and a
    # plain copy both handle; it caps an encoder at protobuf's 2 GB.
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


def export_onnx(folder: str | Path, out_dir: str | Path, opset: int = 18, example_batch: int = 3,
                metrics: dict[str, float] | None = None,
                evaluated_templates: dict[str, list[str]] | None = None,
                evaluated_sets: dict[str, str] | None = None, training_data: str | None = None) -> Path:
    """Write image_encoder.onnx, text_encoder.onnx, tokenizer.json, preprocess.json and MODEL.md into
    `out_dir`; returns it. The folder describes itself: MODEL.md and preprocess.json (also stamped into
    each graph's metadata_props) give every step from a file to an embedding. `metrics` (name -> value),
    `evaluated_templates` (task or set -> the templates its metrics were measured with) and
    `evaluated_sets` (held-out set -> what it is: its file, images and classes) and `training_data`
    (what the model was trained on, with its licence) go into the card; the clients' default templates
    stay DEFAULT_TEMPLATES, the bare class name.

    Image graph: `pixels` float32 [N, 3, S, S] (normalised, S = image_size pixels) -> `embedding`
    float32 [N, embed_dim]; text graph: `tokens` int64 [N, context_length] -> `embedding`; both
    L2-normalised. The example batch only traces the graph; the batch axis is exported symbolic, so
    any batch size runs, and so is the text graph's sequence axis (any L <= context_length). The folder appears complete or not at all.

    Raises: ValueError when tokenizer.json's pad id or context length disagrees with the model;
    FileNotFoundError when the model folder lacks config.json or a file it names;
    onnx.checker.ValidationError when an exported graph fails ONNX's full check.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    model, config = load_model(folder)
    cfg = model.cfg
    tok = load_tokenizer(folder / config["tokenizer"])
    if tok.token_to_id(PAD) != cfg.pad_id or context_length(tok) != cfg.context_length:
        raise ValueError(f"{folder}: tokenizer.json (pad id {tok.token_to_id(PAD)}, context {context_length(tok)}) "
                         f"does not match the model (pad id {cfg.pad_id}, context {cfg.context_length})")
    size = config["preprocess"]["image_size"]
    pixels = torch.randn(example_batch, 3, size, size)
    tokens = torch.randint(3, cfg.vocab_size, (example_batch, cfg.context_length))
    preprocess = {**config["preprocess"], "context_length": cfg.context_length,
                  "pad_id": tok.token_to_id(PAD), "sot_id": tok.token_to_id(SOT), "eot_id": tok.token_to_id(EOT),
                  "embed_dim": cfg.output_dim, "logit_scale": model.logit_scale.exp().mean().item(),
                  "templates": list(DEFAULT_TEMPLATES), "evaluated_templates": evaluated_templates or {},
                  "image_steps": IMAGE_STEPS, "text_steps": TEXT_STEPS,
                  "outputs": "both encoders return float32 [N, embed_dim] L2-normalised embeddings",
                  "pillow": PIL.__version__, "support": None}
    support = Support.find(folder)
    if support:
        preprocess["support"] = {"file": SUPPORT_FILE, "weight": support.weight, "temperature": support.temperature,
                                 "images": len(support.images), "captions": len(support.captions)}
    with atomic_path(out_dir) as tmp, torch.no_grad():
        tmp.mkdir()
        batch = torch.export.Dim("batch")
        _export(_Encoder(model, "image"), pixels, "pixels", tmp / IMAGE_ONNX, opset, {0: batch})
        # The sequence axis is symbolic too, so a batch of short captions runs without its pad columns
        # (`tokenizer.trim_padding`, exact for the causal tower): 256 captions in about half the time.
        _export(_Encoder(model, "text"), tokens, "tokens", tmp / TEXT_ONNX, opset,
                {0: batch, 1: torch.export.Dim("sequence", min=1, max=cfg.context_length)})
        (tmp / TOKENIZER_JSON).write_text(standalone_tokenizer(tok))
        preprocess["onnx"] = onnx_format([tmp / IMAGE_ONNX, tmp / TEXT_ONNX])
        (tmp / PREPROCESS_JSON).write_text(json.dumps(preprocess, indent=2) + "\n")
        if support:
            shutil.copy(folder / SUPPORT_FILE, tmp / SUPPORT_FILE)
        (tmp / MODEL_CARD).write_text(model_card(preprocess, config, metrics or {}, evaluated_sets or {}, training_data))
        for name in (IMAGE_ONNX, TEXT_ONNX):
            stamp_metadata(tmp / name, preprocess)
    return out_dir


def onnx_format(paths: list[Path]) -> dict:
    """What a runtime must implement to run the graphs at `paths`: the highest ONNX IR version, and the
    version of each operator domain their nodes use ("ai.onnx" for the default one; domains only
    imported, as the quantiser's helper domains are, are left out). Also the onnxruntime that export
    checks them with."""
    models = [onnx.load(str(p), load_external_data=False) for p in paths]
    used = {n.domain for m in models for n in m.graph.node}
    return {"ir_version": max(m.ir_version for m in models),
            "opsets": {o.domain or "ai.onnx": o.version for m in models for o in m.opset_import if o.domain in used},
            "checked_with": f"onnxruntime {onnxruntime.__version__}"}


def standalone_tokenizer(tok: Tokenizer) -> str:
    """tokenizer.json that encodes like `load_tokenizer` in any `tokenizers` port, as a JSON string.

    The special tokens leave the added-token list (they stay in the BPE vocabulary and the SOT/EOT
    template keeps their ids), so no caption text can ever produce them, whatever a client's
    `encode_special_tokens` default; the ids, truncation and padding are unchanged.
    """
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = []
    return json.dumps(spec, ensure_ascii=False)


def stamp_metadata(path: Path, preprocess: dict) -> None:
    """Copy preprocess.json's facts into the graph's metadata_props (string values; lists as JSON), so
    a client holding only the .onnx file still knows how to feed it. The exporter's notes on each node
    (stack traces with this machine's source paths, FX names) go: the file's bytes then depend on the
    model, not on where the code was checked out."""
    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for node in graph.graph.node:
        del node.metadata_props[:]
    for key, value in preprocess.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    onnx.save(graph, str(path))


@torch.no_grad()
def parity(folder: str | Path, onnx_dir: str | Path, images: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    """Worst disagreement between onnxruntime and torch on uint8 images [N, S, S, 3] and int token ids
    [N, L]: the largest absolute difference of any embedding component and the smallest cosine.

    The onnxruntime side normalises pixels with the runtime's own code and preprocess.json, the torch
    side with training's `to_tensor`, so the constants travelling through the export are checked too.

    Raises: FileNotFoundError when either folder is incomplete.
    """
    model, _ = load_model(folder)
    rt = ClipRuntime.load(onnx_dir)
    pairs = [(rt.embed_pixels(images), F.normalize(model.encode_image(to_tensor(images)), dim=-1).numpy()),
             (rt.embed_tokens(tokens), F.normalize(model.encode_text(torch.from_numpy(tokens).long()), dim=-1).numpy())]
    diff = max(float(np.abs(o - t).max()) for o, t in pairs)
    cosine = min(float((o * t).sum(-1).min()) for o, t in pairs)  # both sides are unit vectors
    return {"max_abs_diff": diff, "min_cosine": cosine}


def batch_dependence(rt: ClipRuntime, images: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    """Largest absolute difference, per encoder, between each item embedded alone and the same item
    embedded in one batch with the others: uint8 images [N, S, S, 3], int token ids [N, L]. Zero (or
    float rounding) means a search index built in batches agrees with single queries."""
    one = {"image": np.concatenate([rt.embed_pixels(images[i:i + 1]) for i in range(len(images))]),
           "text": np.concatenate([rt.embed_tokens(tokens[i:i + 1]) for i in range(len(tokens))])}
    return {"image": float(np.abs(one["image"] - rt.embed_pixels(images)).max()),
            "text": float(np.abs(one["text"] - rt.embed_tokens(tokens)).max())}


class _Calibration(CalibrationDataReader):
    """Feeds one graph input in batches to onnxruntime's calibrator."""

    def __init__(self, name: str, batches: list[np.ndarray]):
        self.feeds = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def quantize_int8(onnx_dir: str | Path, out_dir: str | Path, images: np.ndarray, tokens: np.ndarray,
                  batch_size: int = 32) -> dict[str, int]:
    """Statically quantised copy of both encoders (QDQ: int8 weights per output channel, uint8
    activations whose scales are calibrated once, by min/max, on `images` uint8 [N, S, S, 3] and
    `tokens` int [N, L], which should be training images and captions).

    Static, not dynamic: dynamic quantisation computes activation scales per call, so an embedding
    depended on its batch companions (text cosine 0.9993 between batch 1 and batch 32). With fixed
    scales every row is computed alone, and batch 1 equals batch 32. Conv, MatMul and Gemm with
    weights are quantised (nearly all parameters), except the image's first layer. Returns each encoder's size in bytes, before and
    after. The folder appears complete or not at all.

    Raises: FileNotFoundError when `onnx_dir` lacks an encoder, tokenizer.json, preprocess.json or MODEL.md;
    ValueError when `images` or `tokens` is empty.
    """
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    if not len(images) or not len(tokens):
        raise ValueError("quantize_int8: calibration needs at least one image and one caption")
    pixels = Preprocess.read(onnx_dir / PREPROCESS_JSON).normalise(images)
    ids = trim_padding(tokens).astype(np.int64)  # one length for all batches: the calibrator stacks them
    feeds = {IMAGE_ONNX: _Calibration("pixels", [pixels[i:i + batch_size] for i in range(0, len(pixels), batch_size)]),
             TEXT_ONNX: _Calibration("tokens", [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)])}
    sizes = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name in (IMAGE_ONNX, TEXT_ONNX):
            # onnxruntime's recommended preparation (constant folding and fusions, so fused weights are
            # quantised once). Its symbolic shape inference cannot follow the exporter's dynamic Expand
            # shapes; ONNX's own shape inference still runs.
            prepared = tmp / f"prepared-{name}"
            quant_pre_process(onnx_dir / name, prepared, skip_symbolic_shape=True)
            # The fused graph can keep value_info from before the fusions, whose shapes the quantiser's
            # strict shape inference rejects (onnxruntime 1.30 on the ResNet's attention pool): drop it,
            # the quantiser infers every shape again.
            model = onnx.load(prepared)
            del model.graph.value_info[:]
            onnx.save(model, prepared)
            # Left in float: products of two activations (attention's Q K^T and its weights times V) and the
            # image's first layer (stem convolution or patch embedding), which sees raw pixels and holds few
            # weights; quantising it cost the default model 0.011 top-1 on unseen compositions, 0.003 without.
            weights = {init.name for init in model.graph.initializer}
            keep_float = [n.name for n in model.graph.node if n.op_type == "MatMul" and not weights.intersection(n.input)]
            keep_float += [n.name for n in model.graph.node if n.op_type == "Conv"][:1]
            quantize_static(prepared, tmp / name, feeds[name], quant_format=QuantFormat.QDQ,
                            nodes_to_exclude=keep_float,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            prepared.unlink()
            stem = name.removesuffix(".onnx")
            sizes[f"{stem}_fp32"] = (onnx_dir / name).stat().st_size
            sizes[f"{stem}_int8"] = (tmp / name).stat().st_size
        shutil.copy(onnx_dir / TOKENIZER_JSON, tmp / TOKENIZER_JSON)
        fmt = onnx_format([tmp / IMAGE_ONNX, tmp / TEXT_ONNX])
        preprocess = {**json.loads((onnx_dir / PREPROCESS_JSON).read_text()), "onnx": fmt}
        (tmp / PREPROCESS_JSON).write_text(json.dumps(preprocess, indent=2) + "\n")
        if (onnx_dir / SUPPORT_FILE).is_file():  # optional: written by evaluate, copied by export_onnx
            shutil.copy(onnx_dir / SUPPORT_FILE, tmp / SUPPORT_FILE)
        (tmp / MODEL_CARD).write_text((onnx_dir / MODEL_CARD).read_text() + f"""
## Quantisation
Both encoders here are statically quantised (onnxruntime QDQ): int8 weights per output channel, uint8
activations with scales calibrated once (min/max) on {len(images)} training images and {len(tokens)} captions.
Left in float: products of two activations (attention) and the image encoder's first layer. Scales are
fixed, so an embedding never depends on the other items of its batch. Inputs, outputs and preprocessing
are those above; the metrics above were measured with the float32 encoders. These graphs' format:
{format_line(fmt)}
""")
    return sizes


def main() -> None:
    """`python -m clipmodel.export`: export, check parity on random inputs, optionally quantise
    (calibrated on the train split of the corpus folder `--data`).

    Raises: SystemExit when the model folder has no config.json, or --int8 is given without --data.
    """
    parser = argparse.ArgumentParser(description="Export a trained model folder to ONNX for clip-onnx.")
    parser.add_argument("--model", default="models", help="folder with clip.safetensors, config.json, tokenizer.json")
    parser.add_argument("--out", default="models/onnx")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--int8", metavar="DIR", help="also write an int8 copy here (needs --data)")
    parser.add_argument("--data", metavar="DIR", help="the corpus folder (ingest + tokenize) that calibrates int8")
    parser.add_argument("--training-data", metavar="TEXT",
                        help="MODEL.md's words on what the model was trained on and the data's licence")
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"export: {args.model}/config.json not found (run the train stage first)")
    if args.int8 and not args.data:
        raise SystemExit("export: --int8 needs --data, the corpus whose training images and captions calibrate it")
    out = export_onnx(args.model, args.out, args.opset, training_data=args.training_data)
    size = json.loads((out / PREPROCESS_JSON).read_text())["image_size"]
    images = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    tokens, _ = encode(load_tokenizer(out / TOKENIZER_JSON), ["", "a photo of a red circle.", "two blue squares " * 50])
    print(f"export: wrote {out}; parity {parity(args.model, out, images, tokens)}")
    if args.int8:
        print(f"export: wrote {args.int8}; sizes {quantize_int8(out, args.int8, *calibration_sample(Corpus.load(args.data)))}")


def calibration_sample(corpus: Corpus, n: int = CALIBRATION_IMAGES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n', S, S, 3] and their first captions' tokens [n', L] for int8 calibration: up to `n`
    train images drawn with `seed` (the whole corpus when it has no train split)."""
    train = np.flatnonzero(corpus.manifest.split.to_numpy() == "train")
    pool = train if len(train) else np.arange(len(corpus.manifest))
    pick = np.sort(np.random.default_rng(seed).choice(pool, min(n, len(pool)), replace=False))
    return corpus.images(pick), np.asarray(corpus.tokens[corpus.caption_start[pick]])


if __name__ == "__main__":
    main()
