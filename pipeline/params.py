"""The params.yaml schema: one pydantic model per stage section, validated in one place.

The defaults here are the root params.yaml's values (tests/test_params.py fails if they differ), so a
params file that leaves a key out gets what params.yaml documents.

A bad key is reported as one line naming params.yaml and the dotted key; the stage exits
with status 2 and no traceback, so a typo in a sweep fails before any work is done.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    """Base of every section: an unknown key is an error (a typo never falls back to a default), and a
    loaded section is immutable (derive a changed copy with model_copy), so what ran is what was read."""
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSource(Section):
    """data.synthetic: generated shape scenes (clipmodel.synthetic); holdout_fraction of the (colour, shape)
    pairs never appear in train, color_mention is the chance a caption phrase names an object's colour."""
    num_images: int = Field(12000, ge=16)
    holdout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    max_objects: int = Field(3, ge=1, le=3)
    captions_per_image: int = Field(5, ge=1)
    color_mention: float = Field(0.5625, ge=0.0, le=1.0)


class CsvSource(Section):
    """data.csv: open_clip's layout, one (image path, caption) per line, paths relative to the file;
    tab-separated by default (pipeline.sources.read_csv)."""
    path: str | None = None
    image_column: str = "filepath"
    caption_column: str = "title"
    sep: str = "\t"
    quoting: Literal["auto", "csv", "none"] = "auto"  # auto: CSV quoting unless sep is a tab (quotes are text)

    @field_validator("sep")
    @classmethod
    def _one_character(cls, sep: str) -> str:
        if len(sep) != 1:  # the csv module's own error would name neither the key nor the fix
            raise ValueError(f'one character, not {sep!r}; in YAML a tab is "\\t" in double quotes')
        return sep


class CocoSource(Section):
    """data.coco: a COCO captions JSON and its image folder (null: the JSON's own folder)."""
    annotations: str | None = None
    images: str | None = None


class WebDatasetSource(Section):
    """data.webdataset: .tar shards, a glob or a brace range (clipmodel.shards.shard_paths), whose
    samples are an image (key.jpg, key.png, ...) and key.txt."""
    shards: str | None = None


class FolderSource(Section):
    """data.folder: a folder of images, each with a sidecar caption (photo.jpg + photo.txt)."""
    path: str | None = None


class DataParams(Section):
    """The ingest stage's section: which source, and how its images are stored (image_size pixels square,
    uint8 RGB, alpha composited onto `background`) and split (val/test fractions, by key hash).

    Validation rejects a channel outside 0..255, val_fraction + test_fraction >= 1, and a source whose
    own section lacks its path.
    """
    source: Literal["synthetic", "csv", "coco", "webdataset", "folder"] = "synthetic"
    seed: int = 0
    image_size: int = Field(64, ge=8, le=1024)
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = Field(89_478_485, ge=1, le=89_478_485)  # at most PIL's own limit, which it enforces itself
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    workers: int = Field(2, ge=1)
    shard_images: int = Field(4096, ge=1)
    output_format: Literal["npy", "webdataset"] = "npy"  # webdataset: the train split as tar shards
    synthetic: SyntheticSource = SyntheticSource()
    csv: CsvSource = CsvSource()
    coco: CocoSource = CocoSource()
    webdataset: WebDatasetSource = WebDatasetSource()
    folder: FolderSource = FolderSource()

    @model_validator(mode="after")
    def _check(self) -> "DataParams":
        if any(not 0 <= c <= 255 for c in self.background):
            raise ValueError("background: each channel must be in 0..255")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        required = {"csv": ("csv", "path"), "coco": ("coco", "annotations"),
                    "webdataset": ("webdataset", "shards"), "folder": ("folder", "path")}
        if self.source in required:
            section, key = required[self.source]
            if getattr(getattr(self, section), key) is None:
                raise ValueError(f"source is {self.source!r} but {section}.{key} is not set")
        return self


class TokenizeParams(Section):
    """The tokenize stage's section: BPE vocabulary size, context length in tokens (longer captions
    are cut), and the optional caption views; caption_view_sep must compile as a regex."""
    vocab_size: int = Field(1024, ge=300, le=262_144)
    context_length: int = Field(32, ge=4, le=512)
    # Extra train captions per caption built from its parts (pipeline/tokenize.py, caption_views): 0 is off.
    caption_views: int = Field(0, ge=0)
    caption_view_sep: str = r"[(),;]"  # regex that splits a caption into its head and its other parts

    @model_validator(mode="after")
    def _check(self) -> "TokenizeParams":
        try:
            re.compile(self.caption_view_sep)
        except re.error as e:
            raise ValueError(f"caption_view_sep is not a regular expression: {e}") from None
        return self


class ModelParams(Section):
    """The CLIP architecture (pipeline.run.model_config adds image size, context length and vocabulary).

    Validation: a ViT takes one int of vision_layers, a ResNet four stage depths; each tower's heads
    must divide its width (for a ResNet, the attention pool's vision_width * 32).
    """
    vision: Literal["vit", "resnet"] = "resnet"
    embed_dim: int = Field(128, ge=1)
    vision_width: int = Field(16, ge=8)
    vision_layers: int | tuple[int, int, int, int] = (1, 1, 1, 1)  # an int for ViT, four stage depths for ResNet
    vision_heads: int = Field(8, ge=1)
    vision_patch_size: int = Field(8, ge=1)
    text_width: int = Field(128, ge=8)
    text_layers: int = Field(3, ge=1)
    text_heads: int = Field(4, ge=1)
    ensemble: int = Field(1, ge=1)  # CLIPs trained side by side as one deep ensemble (clipmodel.model.CLIPEnsemble)

    @model_validator(mode="after")
    def _check(self) -> "ModelParams":
        if self.vision == "vit" and not isinstance(self.vision_layers, int):
            raise ValueError("vision_layers: a ViT takes one int")
        if self.vision == "resnet" and isinstance(self.vision_layers, int):
            raise ValueError("vision_layers: a ResNet takes four stage depths, e.g. [1, 1, 1, 1]")
        vision_dim = self.vision_width * (32 if self.vision == "resnet" else 1)  # ResNet: the attention pool's width
        for width, heads, name in ((vision_dim, self.vision_heads, "vision"), (self.text_width, self.text_heads, "text")):
            if width % heads:
                raise ValueError(f"{name}_heads={heads} must divide the {name} width {width}")
        return self


class TrainParams(Section):
    """The train stage's section, also the optimiser and schedule of the supervised and efficiency stages.

    `loss`: contrastive is CLIP's symmetric cross-entropy (Radford et al. 2021), sigmoid is SigLIP
    (Zhai et al. 2023). batch_size is the global batch and must divide by nproc x accum_steps.
    `ssl_weight` > 0 adds SLIP's image self-supervision (Mu et al. 2022): a second view of every image
    (`ssl_crop_scale`, then the colour augmentation) and SimCLR's NT-Xent between the two views' image
    embeddings (clipmodel.loss.nt_xent_loss), weighted into the loss.
    Validation also checks the crop ranges (0 < low <= high, scale <= 1), the colour augmentation's
    (clipmodel.data.ColorAugment) and betas in [0, 1).
    """
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    vision_lr: float | None = Field(0.005, gt=0)  # the image tower's peak lr; None: train.lr
    weight_decay: float = Field(0.2, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup_fraction: float = Field(0.3333333333, ge=0, le=0.5)  # linear warmup over this share of all steps, then cosine
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where the hardware has it
    loss: Literal["contrastive", "sigmoid"] = "contrastive"
    multi_positive: bool = False  # identical normalised captions count as positives of each other
    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)  # aspect ratios of the random crops (1, 1: no stretching)
    color_jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)  # brightness, contrast, saturation strengths
    color_jitter_p: float = Field(0.0, ge=0, le=1)  # share of images jittered
    grayscale_p: float = Field(0.0, ge=0, le=1)
    blur_p: float = Field(0.0, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 1.5)  # Gaussian blur sigma range, pixels
    ssl_weight: float = Field(0.0, ge=0)  # image self-supervision (SLIP): the weight of its NT-Xent loss; 0: off
    ssl_temperature: float = Field(0.1, gt=0)  # NT-Xent's temperature (SimCLR's and SLIP's 0.1)
    ssl_crop_scale: tuple[float, float] = (0.5, 1.0)  # the self-supervised view's random resized crop, area share
    checkpoint_every: int = Field(200, ge=1)
    resume: bool = True  # continue from checkpoints/ when its fingerprint matches these params and data
    max_bad_steps: int = Field(5, ge=1)  # non-finite losses in a row before training stops
    log_every: int = Field(10, ge=1)
    workers: int = Field(0, ge=0)  # DataLoader processes; 0 assembles batches in the training process
    shuffle_buffer: int = Field(2048, ge=1)  # WebDataset route: decoded samples each stream reader shuffles among
    nproc: int = Field(1, ge=1)  # data-parallel processes on this machine (clipmodel.distributed.relaunch); batch_size is the global batch
    local_loss: bool = False  # each process computes only its rows of the logit matrices: same gradients, less memory
    accum_steps: int = Field(1, ge=1)  # micro-batches per batch; exact for the contrastive loss (GradCache)
    grad_checkpointing: bool = False  # recompute transformer activations in backward: memory for compute
    compile: bool = False  # torch.compile the model

    @model_validator(mode="after")
    def _check(self) -> "TrainParams":
        if self.batch_size % (self.nproc * self.accum_steps):
            raise ValueError(f"batch_size={self.batch_size} must be divisible by nproc x accum_steps "
                             f"= {self.nproc * self.accum_steps}")
        for name in ("crop_scale", "ssl_crop_scale"):
            if not 0 < getattr(self, name)[0] <= getattr(self, name)[1] <= 1:
                raise ValueError(f"{name} must be 0 < low <= high <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError("crop_ratio must be 0 < low <= high")
        if not all(0 <= j <= 1 for j in self.color_jitter):
            raise ValueError("color_jitter strengths must be in [0, 1]")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError("blur_sigma must be 0 < low <= high")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must be in [0, 1)")
        return self


class SupervisedParams(Section):
    """The supervised baseline's own random-resized-crop ranges; everything else comes from train."""
    # The shape label does not change under crops, so the baseline keeps them whatever CLIP uses.
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)


class HeldOutSet(Section):
    """A labelled set scored zero-shot (clipmodel.evaluation): a CSV of image,label rows or an ImageFolder."""
    path: str
    # the class list; or label -> the name prompted for it (folder names such as n02099601); or a file of
    # either (.csv/.tsv columns label,name; else one class per line); null: the sorted labels
    classnames: list[str] | dict[str, str] | str | None = None
    templates: str | None = None  # a key of evaluate.templates; null: clipmodel.templates.DEFAULT_TEMPLATES

    @field_validator("classnames", mode="before")
    @classmethod
    def _labels_are_strings(cls, v: object) -> object:
        """Labels are strings (clipmodel.evaluation.LabelledSet), and YAML reads `01`, `1.50`, `null` or
        `yes` unquoted as something else, which no str() gives back (`01` and `1` become one key): refused."""
        for x in [*v.keys(), *v.values()] if isinstance(v, dict) else v if isinstance(v, list) else []:
            if not isinstance(x, str):
                raise ValueError(f"YAML read {x!r} ({type(x).__name__}), not a label or name: quote labels "
                                 "and names that look like numbers, booleans or null ('01', 'null')")
        return v


class EvaluateParams(Section):
    """The evaluate stage's section (export reuses templates, datasets and batch_size for its checks)."""
    templates: str = "templates/prompts.yaml"  # key -> templates; the first is the single-template baseline
    datasets: dict[str, HeldOutSet] = {}  # name -> held-out labelled set, scored into zero_shot.<name>
    batch_size: int = Field(256, ge=1)
    retrieval_chunk: int = Field(2048, ge=1)
    probe_grid: list[float] = [0.01, 0.1, 1.0, 10.0, 100.0]  # logistic-regression C values tried on val
    # Support-set zero-shot (clipmodel/support.py): class vector + weight * its training images. 0: the
    # paper's zero-shot. The bank (models/support.safetensors) is written either way, for the CLIs.
    support_weight: float = Field(0.0, ge=0)
    support_temperature: float = Field(0.01, gt=0)  # of the softmax over caption cosines
    support_images: int = Field(100_000, ge=1)      # training images in the bank at most (a seeded sample beyond)


class ExportParams(Section):
    """The export stage's section: the ONNX opset, the parity tolerances the stage fails beyond, the
    int8 variant's allowed top-1 loss (a fraction), the metric the registry ranks models by, and the
    training data's description and licence for the model card."""
    opset: int = Field(18, ge=17)
    max_abs_diff: float = Field(1e-4, gt=0)      # onnxruntime vs torch embeddings: fail above this
    min_cosine: float = Field(0.99999, gt=0, le=1)
    int8_max_drop: float = Field(0.01, ge=0)     # publish the int8 variant only within this top-1 loss
    # A key of reports/metrics.json; higher wins `champion`. null: the first held-out set's top1, else
    # zero_shot.shape.top1 on synthetic data, else retrieval.image_to_text.r1.
    champion_metric: str | None = None
    dataset: str | None = None          # MODEL.md: what the model was trained on (name, version, where from)
    dataset_license: str | None = None  # MODEL.md: that data's licence


class EfficiencyParams(Section):
    """The data-efficiency study (efficiency/dvc.yaml): every objective on the same data, encoder and budget."""
    budget_images: int = Field(64000, ge=2)      # images seen by each objective (steps * train.batch_size)
    checkpoints: int = Field(7, ge=2)            # zero-shot evaluations, log-spaced in images seen
    first_checkpoint: int = Field(1280, ge=1)    # images seen at the first evaluation
    target_accuracy: float | None = Field(None, gt=0, le=1)  # null: half the contrastive model's final mean top-1
    tasks: list[str] = ["shape", "color", "composition_seen"]  # synthetic tasks or evaluate.datasets names
    eval_images: int = Field(128, ge=1)          # test images per task (captioners score every prompt per image)
    decoder_width: int = Field(128, ge=8)        # the captioners' decoder (and encoder) Transformer
    decoder_layers: int = Field(3, ge=1)
    decoder_heads: int = Field(4, ge=1)
    encoder_layers: int = Field(1, ge=1)         # encoder-decoder captioner: Transformer layers over the image grid
    warmup_fraction: float | None = Field(0.2, ge=0, le=0.5)  # the study's own share of its budget; null: train's

    @model_validator(mode="after")
    def _check(self) -> "EfficiencyParams":
        if self.decoder_width % self.decoder_heads:
            raise ValueError(f"decoder_heads={self.decoder_heads} must divide decoder_width {self.decoder_width}")
        if self.first_checkpoint >= self.budget_images:
            raise ValueError("first_checkpoint must be below budget_images")
        if not self.tasks:
            raise ValueError("tasks: name at least one zero-shot task")
        return self


class Params(Section):
    """All of params.yaml: one field per section, each defaulting to params.yaml's own values."""
    data: DataParams = DataParams()
    tokenize: TokenizeParams = TokenizeParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    supervised: SupervisedParams = SupervisedParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    efficiency: EfficiencyParams = EfficiencyParams()


class ParamsError(SystemExit):
    """Raised (as a clean exit with status 2) when params.yaml does not validate."""


class ParamsInvalid(ValueError):
    """params.yaml cannot be read or does not validate; the message is one line naming the file and,
    for a validation error, the first bad key (`params.yaml: <key>: <msg>`)."""


def _format(err: ValidationError, path: Path) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{path}: {key}: {msg}{more}"


def read_params(path: str | Path = PARAMS_FILE) -> Params:
    """params.yaml, validated; an empty file is all defaults. For callers that go on after a bad file
    (the Prefect flows check a run's params before DVC deletes any output); stages use load_params.

    Raises: ParamsInvalid when the file is missing, unreadable, not YAML, or does not validate.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsInvalid(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not UTF-8
        raise ParamsInvalid(f"{path}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        raise ParamsInvalid(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsInvalid(_format(e, path)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """params.yaml, validated (read_params), for a stage: a bad file ends the process cleanly.

    Raises: ParamsError (a SystemExit with status 2, after read_params' one line on stderr) when the
    file is missing, unreadable, not YAML, or does not validate.
    """
    try:
        return read_params(path)
    except ParamsInvalid as e:
        print(e, file=sys.stderr)
        raise ParamsError(2) from None
