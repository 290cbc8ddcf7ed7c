"""Zero-shot transfer of two CLIP recipes trained on the same real captioned data, scored by one evaluator.

Both sides train from scratch on the same captioned images for the same epochs and batch, then classify each
held-out labelled set with clipmodel.evaluation.score, once per template list of the templates YAML:
with the paper's zero-shot (`scores`) and, when the recipe's evaluate.support_weight is positive,
with support-set zero-shot (`scores_support`, clipmodel.support: each side's own embeddings of the
training rows join its class vectors, at the recipe's weight and temperature). The bank is every
training row, for both sides alike; the evaluate stage's is the train split's images, at most
evaluate.support_images of them, so the project side equals the recipe's DVC metrics where the
recipe splits off no val or test images and has fewer images than that cap (real/params.yaml).
Both train on the recipe's own data (data.<source> of --params, paths relative to the params file,
as the stages read them; real/params.yaml's ../../shared/real-emoji/train.csv is the repo's
../shared/real-emoji/train.csv, OpenMoji artwork with CLDR names + tags), and the held-out sets are by
default ../shared/real-emoji's (from the repo root) eval_cross_style.csv
(the same concepts as Fluent Emoji) and eval_unseen.csv (concepts never trained on). `--data DIR`
takes DIR/eval_*.csv instead, and for a CSV recipe DIR/train.csv; `--train` (a CSV recipe's) and
`--eval-set NAME=PATH` (a labelled CSV or an ImageFolder, repeatable; `--classnames NAME=FILE` gives
a set's class list, as evaluate.datasets' `classnames`) name any other files. The
training data is read as the project's ingest reads it (pipeline.sources, with the recipe's columns,
separator and quoting for a CSV), and open_clip trains on the same (image, caption) pairs, one CSV
row per caption (images inside shards are written to a scratch folder for it): what ingest refuses,
and images that do not decode, are left out of both sides, counted and listed in the output. An
epoch is each trainer's own: open_clip passes over the rows, the project over the images, a caption
drawn each time, so on data with several captions per image open_clip takes that many times the
steps (both sides' `steps` are in the output).

- open_clip: its own trainer (`python -m open_clip_train.main`, CPU) with a small ViT (OPEN_CLIP_CONFIG,
  registered through open_clip.add_model_config), open_clip's tokenizer and its defaults except warmup
  (10% of the steps; its default of 10,000 is longer than the run). Its transforms keep alpha as
  open_clip would not: transparent pixels are composited onto the project's data.background, as
  ingest does, instead of convert("RGB") revealing the black stored under them.
- project: ingest, tokenize and train of --params (default real/params.yaml), run in a scratch copy of the
  repo's code.

Writes reports/benchmarks/real_zero_shot.json for real/params.yaml on real-emoji, and for other
inputs reports/benchmarks/real_zero_shot_<what differs>.json (e.g. `_mydata_pets` for --params
mydata/params.yaml --eval-set pets=...), unless --out; a partial rerun keeps the other side's last result:

    python benchmarks/real_zero_shot.py [--epochs N] [--data DIR] [--skip-openclip | --skip-project] [--keep DIR]
    python benchmarks/real_zero_shot.py --skip-openclip -S tokenize.vocab_size=4096 --out …/lever.json  # one lever
    python benchmarks/real_zero_shot.py --rescore WORK --out OUT   # score again the models of a --keep WORK run
    python benchmarks/real_zero_shot.py --params mydata/params.yaml --train /data/pairs.tsv \
        --eval-set pets=/data/pets/test.csv --eval-set styles=/data/styles --out mydata/vs_open_clip.json

Raises SystemExit (one line) when a file is missing, the training CSV lacks the recipe's columns, --train
names a CSV for a recipe of another source, a set is given twice, or --classnames names no set.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image
from scipy.stats import binomtest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout, installed or not
from benchmarks.machine import device_name  # noqa: E402
from benchmarks.pipeline_time import override  # noqa: E402
from clipmodel.encoder import Encoder  # noqa: E402
from clipmodel.evaluation import DatasetError, LabelledSet, embed_set, zero_shot  # noqa: E402
from clipmodel.evaluation import embed_images as embed_images_of  # noqa: E402
from clipmodel.images import ImageError, decode, to_rgb  # noqa: E402
from clipmodel.io import write_json  # noqa: E402
from clipmodel.support import Support  # noqa: E402
from clipmodel.zeroshot import unit  # noqa: E402
from pipeline.device import resolve_device, resolve_precision  # noqa: E402
from pipeline.params import DataParams  # noqa: E402
from pipeline.sources import Rejection, SourceError, read  # noqa: E402

REPORTED = ("top1", "top5", "mean_per_class_recall", "top1_single_template", "n", "classes", "rejected")
OPEN_CLIP_MODEL = "ViT-192-8-64"  # "vit" in the name selects open_clip's ViT defaults: lr 5e-4, betas (0.9, 0.98), eps 1e-6
OPEN_CLIP_CONFIG = {
    "embed_dim": 192,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 4},
}
OPEN_CLIP_PRECISION = "amp_bf16"
LAUNCHER = "import sys; from benchmarks.real_zero_shot import launch; launch(sys.argv[1:])"
SOURCE_PATHS = {"csv": ("path",), "coco": ("annotations", "images"), "webdataset": ("shards",), "folder": ("path",)}


def composite_alpha(background: list[int]) -> None:
    """Make open_clip's transforms turn PIL images to RGB as ingest does (alpha onto `background`)
    where open_clip's MaybeConvertMode calls convert("RGB")."""
    import open_clip.transform

    def convert(self: Any, pic: Any) -> Any:
        return to_rgb(pic, tuple(background)) if isinstance(pic, Image.Image) else pic
    open_clip.transform.MaybeConvertMode.__call__ = convert


def launch(argv: list[str]) -> None:
    """open_clip_train.main with our model config registered and alpha composited; argv: config JSON
    path, background as JSON, then open_clip_train's arguments."""
    import open_clip
    import open_clip_train.main

    open_clip.add_model_config(argv[0])
    composite_alpha(json.loads(argv[1]))
    open_clip_train.main.main(argv[2:])


def run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, every: float = 60.0) -> float:
    """Run `cmd`, output to `log`, echoing its latest line at most every `every` seconds (a 20-minute
    training is not silent); wall seconds, or exit with the log's tail."""
    start = shown = time.perf_counter()
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"}, text=True,
                                               errors="replace", stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # universal newlines: tqdm's \r updates arrive as lines too
            f.write(line)
            if line.strip() and time.perf_counter() - shown >= every:
                print(f"  {log.parent.name}/{log.name} | {line.strip()[:150]}", flush=True)
                shown = time.perf_counter()
    code = proc.returncode
    if code:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({code}); {log}:\n" + "\n".join(log.read_text().splitlines()[-25:]))
    return round(time.perf_counter() - start, 1)


def named_paths(given: list[str], flag: str) -> dict[str, Path]:
    """`flag`'s NAME=PATH assignments, each path existing, as absolute paths by name."""
    named: dict[str, Path] = {}
    for assignment in given:
        name, sep, path = assignment.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"real_zero_shot: {flag} {assignment!r}: expected NAME=PATH")
        if name in named:
            raise SystemExit(f"real_zero_shot: {flag} {name} given twice")
        if not Path(path).exists():
            raise SystemExit(f"real_zero_shot: {flag} {name}: {path} not found")
        named[name] = Path(path).resolve()
    return named


def eval_set_paths(data: Path, given: list[str]) -> dict[str, Path]:
    """The held-out sets' files by name: `given` NAME=PATH assignments, or else every data/eval_*.csv by its stem."""
    if given:
        return named_paths(given, "--eval-set")
    found = {p.stem: p for p in sorted(data.glob("eval_*.csv"))}
    if not found:
        raise SystemExit(f"real_zero_shot: {data} has no eval_*.csv; name the sets with --eval-set NAME=PATH")
    return found


def load_sets(paths: dict[str, Path], classnames: dict[str, Path] | None = None) -> dict[str, LabelledSet]:
    """Each set read (not its images) before any training, so a bad one costs no training time;
    `classnames`: a class-list file by set name, as evaluate.datasets' `classnames`."""
    classnames = classnames or {}
    unknown = sorted(set(classnames) - set(paths))
    if unknown:
        raise SystemExit(f"real_zero_shot: --classnames {unknown[0]}: no held-out set of that name (sets: {', '.join(paths)})")
    try:
        return {name: LabelledSet.load(path, classnames.get(name), name=name) for name, path in paths.items()}
    except DatasetError as e:
        raise SystemExit(f"real_zero_shot: {e}") from None


def recipe_data(data: dict[str, Any], base: Path, train: Path | None) -> dict[str, Any]:
    """The recipe's data section with its source's paths made absolute (they are relative to `base`,
    the params file's folder, where the stages run), and `train` in place of data.csv.path when given.

    Raises: SystemExit (one line) for a synthetic recipe, --train with another source than csv, or a
    source section without its paths."""
    source = data["source"]
    if source not in SOURCE_PATHS:
        raise SystemExit(f"real_zero_shot: the recipe's data.source is {source}; this benchmark trains on "
                         f"captioned images ({', '.join(SOURCE_PATHS)})")
    if train and source != "csv":
        raise SystemExit(f"real_zero_shot: --train names a training CSV, but the recipe's data.source is {source}: "
                         f"both sides train on its data.{source}")
    section = {**(data.get(source) or {}), **({"path": str(train)} if train else {})}
    for key in SOURCE_PATHS[source]:
        if not section.get(key):
            raise SystemExit(f"real_zero_shot: the recipe has no data.{source}.{key}")
        section[key] = os.path.normpath(base / section[key])  # not resolve(): webdataset's is a glob
    return {**data, source: section}


def training_pairs(data: dict[str, Any], scratch: Path) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Every (absolute image path, caption) pair of `data` (a recipe's data section, paths absolute)
    that the project's ingest reads (pipeline.sources.read), one per caption, whose image decodes within
    data.max_pixels; and one {where, reason} per item left out. Images inside shards are written to
    `scratch`, since open_clip's CSV loader opens files.

    Raises: SystemExit (one line) when the source as a whole cannot be read."""
    pairs, left_out = [], []
    recipe = DataParams(**data)
    try:
        for item in read(recipe):
            if isinstance(item, Rejection):
                left_out.append({"where": item.source, "reason": item.reason})
                continue
            try:
                decode(item.image, recipe.max_pixels)
            except ImageError as e:
                left_out.append({"where": item.origin, "reason": str(e)})
                continue
            image = item.image
            if isinstance(image, bytes):
                scratch.mkdir(parents=True, exist_ok=True)
                image = scratch / f"{len(pairs):08d}"  # PIL opens it by its content, not its name
                image.write_bytes(item.image)
            pairs.extend((str(Path(image).absolute()), caption) for caption in item.captions)
    except SourceError as e:  # the recipe's data section does not fit the files
        raise SystemExit(f"real_zero_shot: {e} in the recipe that --params names") from None
    return pd.DataFrame(pairs, columns=["filepath", "caption"]), left_out


def memoised(embed_texts: Callable[[list[str]], np.ndarray]) -> Callable[[list[str]], np.ndarray]:
    """`embed_texts` embedding each distinct string once: the template lists share prompts, and both
    scorings (with and without the support set) build the same class vectors."""
    cache: dict[str, np.ndarray] = {}

    def embed(texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        if new:
            cache.update(zip(new, np.asarray(embed_texts(new))))
        return np.stack([cache[t] for t in texts])
    return embed


@dataclass
class Judge:
    """What both sides are scored on, by the same code: the held-out sets, the template lists, and for
    support-set zero-shot (clipmodel.support) the training rows and the recipe's evaluate.support_*."""
    sets: dict[str, LabelledSet]
    templates: dict[str, list[str]]
    rows: pd.DataFrame
    support_weight: float
    support_temperature: float

    def __call__(self, load_image: Callable[[Path], Any], embed_images: Callable[[list[Any]], np.ndarray],
                 embed_texts: Callable[[list[str]], np.ndarray]) -> dict:
        """`scores`: the paper's zero-shot per set and template list; with a positive support weight also
        `scores_support`, each side's training-row bank built from its own embeddings. Each image is
        embedded once, each prompt once (what clipmodel.evaluation.score does per call, shared)."""
        embed_texts = memoised(embed_texts)
        scorings = {"scores": None}
        out = {}
        if self.support_weight > 0:
            feats, _, rejected = embed_images_of(list(self.rows["filepath"]), load_image, embed_images)
            if rejected:  # training_pairs decoded every row already
                raise SystemExit(f"real_zero_shot: {rejected[0]['image']}: {rejected[0]['reason']}")
            captions = list(self.rows["caption"])
            texts = np.concatenate([embed_texts(captions[i:i + 1024]) for i in range(0, len(captions), 1024)])
            scorings["scores_support"] = Support(unit(feats), unit(texts), np.arange(len(captions)),
                                                 self.support_weight, self.support_temperature)
            out["support"] = {"weight": self.support_weight, "temperature": self.support_temperature}
        for name, ds in self.sets.items():
            feats, kept, rejected = embed_set(ds, load_image, embed_images)
            targets = ds.targets()[kept]
            for key, tmpl in self.templates.items():
                for scoring, bank in scorings.items():
                    result, _ = zero_shot(feats, targets, ds.classnames, embed_texts, tmpl, support=bank)
                    result["rejected"] = len(rejected)  # top5 only with more than 5 classes
                    out.setdefault(scoring, {}).setdefault(name, {})[key] = {k: result[k] for k in REPORTED if k in result}
        return out


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_open_clip(work: Path, judge: Judge, epochs: int, batch: int, background: list[int], seed: int) -> dict:
    rows = judge.rows
    work.mkdir()
    config = work / f"{OPEN_CLIP_MODEL}.json"
    config.write_text(json.dumps(OPEN_CLIP_CONFIG))
    rows.to_csv(work / "train.csv", index=False)  # absolute paths: open_clip opens them relative to its cwd
    warmup = max(1, epochs * (len(rows) // batch) // 10)  # drop_last: full batches only
    argv = ["--train-data", str(work / "train.csv"), "--dataset-type", "csv", "--csv-img-key", "filepath",
            "--csv-caption-key", "caption", "--csv-separator", ",", "--model", OPEN_CLIP_MODEL,
            "--batch-size", str(batch), "--epochs", str(epochs), "--warmup", str(warmup),
            "--precision", OPEN_CLIP_PRECISION, "--device", "cpu", "--workers", "1", "--seed", str(seed),
            "--logs", str(work / "logs"), "--name", "run", "--save-frequency", "0"]  # 0: the last epoch only
    print(f"open_clip: {epochs} epochs of {len(rows) // batch} steps, warmup {warmup} steps, {OPEN_CLIP_PRECISION}", flush=True)
    cmd = [sys.executable, "-c", LAUNCHER, str(config), json.dumps(background), *argv]
    seconds = run_logged(cmd, ROOT, {**os.environ, "PYTHONPATH": str(ROOT)}, work / "train.log")
    checkpoint = work / "logs" / "run" / "checkpoints" / f"epoch_{epochs}.pt"
    return {"model": OPEN_CLIP_MODEL, "config": OPEN_CLIP_CONFIG, "epochs": epochs, "batch": batch,
            "steps": epochs * (len(rows) // batch), "warmup_steps": warmup, "precision": OPEN_CLIP_PRECISION, "seed": seed, "train_seconds": seconds,
            "checkpoint": str(checkpoint), "command": ["python", "-m", "open_clip_train.main", *argv],
            **score_open_clip(config, checkpoint, judge, background)}


def score_open_clip(config: Path, checkpoint: Path, judge: Judge, background: list[int]) -> dict:
    """Parameter count and scores of an open_clip checkpoint, its images preprocessed as in training."""
    import open_clip

    open_clip.add_model_config(config)
    composite_alpha(background)
    model, _, preprocess_val = open_clip.create_model_and_transforms(OPEN_CLIP_MODEL, pretrained=str(checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer(OPEN_CLIP_MODEL)

    @torch.inference_mode()
    def embed_images(images: list[torch.Tensor]) -> np.ndarray:
        return model.encode_image(torch.stack(images), normalize=True).numpy()

    @torch.inference_mode()
    def embed_texts(texts: list[str]) -> np.ndarray:
        return model.encode_text(tokenizer(texts), normalize=True).numpy()

    return {"version": open_clip.__version__, "params": n_params(model),
            **judge(lambda p: preprocess_val(decode(p)), embed_images, embed_texts)}


def train_project(work: Path, judge: Judge, epochs: int, params: dict) -> dict:
    work.mkdir()
    for name in ("clipmodel", "pipeline", "templates"):
        shutil.copytree(ROOT / name, work / name)
    # The Judge scores the held-out sets, not the evaluate stage: without them, train's check for
    # their files (paths relative to the recipe's folder, not to this scratch copy) has none to look for.
    recipe = {**params, "train": {**params["train"], "epochs": epochs}, "evaluate": {**params["evaluate"], "datasets": {}}}
    (work / "params.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    seconds = {stage: run_logged([sys.executable, "-m", f"pipeline.{stage}"], work, env, work / f"{stage}.log")
               for stage in ("ingest", "tokenize", "train")}
    precision = resolve_precision(params["train"]["precision"], resolve_device(params["train"]["device"]))
    steps = json.loads((work / "reports" / "train.json").read_text())["steps"]
    # Ingest merges pixel-identical images (their captions joined), so the project may take fewer steps
    # per epoch than open_clip, which trains on every (image, caption) row as it is.
    ingest = json.loads((work / "reports" / "ingest.json").read_text())
    images = {"images": ingest["accepted"], "duplicates_merged": ingest["duplicates"], "rows_merged": ingest["rows_merged"]}
    print(f"project: {steps} steps over {images['images']} images ({images['duplicates_merged']} pixel-identical "
          f"images merged into others, {images['rows_merged']} rows adding captions); stage seconds {seconds}", flush=True)
    return {"epochs": epochs, "batch": params["train"]["batch_size"], "steps": steps, **images, "precision": precision,
            "train_seconds": seconds["train"], "stage_seconds": seconds, **score_project(work / "models", judge)}


def score_project(folder: Path, judge: Judge) -> dict:
    """Architecture, parameter count and scores of a model folder the train stage wrote (as `clipmodel zeroshot`)."""
    enc = Encoder.load(folder)
    return {"model": enc.model.cfg.to_dict(), "params": n_params(enc.model),
            **judge(enc.load_image, lambda batch: enc.pixels(np.stack(batch)), enc.texts)}


def rescore(work: Path, result: dict, judge: Judge, epochs: int, background: list[int], skip_openclip: bool,
            skip_project: bool) -> None:
    """Score again the models an earlier run kept (--keep WORK) into `result`, keeping its other fields.

    Raises: SystemExit (one line) when WORK lacks a side's model."""
    sides = {"open_clip": work / "open_clip" / "logs" / "run" / "checkpoints" / f"epoch_{epochs}.pt",
             "project": work / "project" / "models" / "clip.safetensors"}
    for side, path in sides.items():
        if (side == "open_clip" and skip_openclip) or (side == "project" and skip_project):
            continue
        if not path.is_file():
            raise SystemExit(f"real_zero_shot: --rescore {work}: {path} not found (run with --keep first)")
        scores = (score_open_clip(work / "open_clip" / f"{OPEN_CLIP_MODEL}.json", path, judge, background)
                  if side == "open_clip" else score_project(path.parent, judge))
        result[side] = {**{k: v for k, v in result.get(side, {}).items() if not k.startswith(("scores", "support"))},
                        **scores}


def default_out(args: argparse.Namespace) -> Path:
    """reports/benchmarks/real_zero_shot.json for the committed comparison (real/params.yaml, real-emoji's
    sets); another recipe, data folder, training file or held-out set adds its name, so that a run on other
    data never overwrites that result nor keeps a side of it."""
    parts = [args.params.resolve().parent.name] if args.params.resolve() != ROOT / "real" / "params.yaml" else []
    parts += [p.resolve().name if p.is_dir() else p.stem for p in (args.data, args.train) if p]
    parts += [spec.partition("=")[0] for spec in args.eval_sets]
    return ROOT / "reports" / "benchmarks" / ("_".join(["real_zero_shot", *parts]) + ".json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, help="both sides' epochs (default: the recipe's train.epochs, after -S)")
    ap.add_argument("--data", type=Path, help="a folder holding eval_*.csv (the held-out sets, named by their stems) "
                    "and, for a CSV recipe, train.csv (default: ../shared/real-emoji's sets, the recipe's own data)")
    ap.add_argument("--train", type=Path, help="a training CSV in place of the recipe's data.csv.path, read with its "
                    "data.csv settings; a recipe of another data.source (coco, webdataset, folder) trains on its own data")
    ap.add_argument("--eval-set", dest="eval_sets", action="append", default=[], metavar="NAME=PATH",
                    help="a held-out labelled set, CSV or ImageFolder (repeatable; default: every DATA/eval_*.csv)")
    ap.add_argument("--classnames", action="append", default=[], metavar="NAME=FILE",
                    help="a held-out set's class list, one name per line, as evaluate.datasets' classnames (repeatable)")
    ap.add_argument("--params", type=Path, default=ROOT / "real" / "params.yaml", help="the project side's recipe")
    ap.add_argument("--templates", type=Path, default=ROOT / "templates" / "prompts.yaml")
    ap.add_argument("--template-keys", nargs="+", default=["label", "clip", "label_and_clip"],
                    help="the lists of --templates to score each side with (templates/prompts.yaml has label, "
                         "clip and label_and_clip)")
    ap.add_argument("--out", type=Path, help="the result JSON (default: named after the inputs, see above)")
    ap.add_argument("--keep", type=Path, help="a new folder to keep the scratch work in (checkpoints, logs); default: a temp dir")
    ap.add_argument("-S", dest="set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the project's params, as `dvc exp run -S` (e.g. tokenize.vocab_size=4096)")
    ap.add_argument("--openclip-seed", type=int, default=0, help="open_clip_train's --seed (its default: 0)")
    ap.add_argument("--skip-openclip", action="store_true")
    ap.add_argument("--skip-project", action="store_true")
    ap.add_argument("--rescore", type=Path, metavar="WORK",
                    help="score the models a run with --keep WORK left, instead of training "
                         "(other fields kept from --out)")
    args = ap.parse_args()
    args.out = args.out or default_out(args)
    start = time.perf_counter()
    data = (args.data or ROOT.parent / "shared" / "real-emoji").resolve()
    paths = eval_set_paths(data, args.eval_sets)
    sets = load_sets(paths, named_paths(args.classnames, "--classnames"))
    lists = yaml.safe_load(args.templates.read_text())
    unknown = [k for k in args.template_keys if k not in lists]
    if unknown:
        raise SystemExit(f"real_zero_shot: --template-keys {unknown[0]}: not in {args.templates} (it has {', '.join(lists)})")
    templates = {k: lists[k] for k in args.template_keys}
    params = yaml.safe_load(args.params.read_text())
    for assignment in args.set:
        override(params, assignment)
    epochs = args.epochs or params["train"]["epochs"]
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    source = params["data"]["source"]
    train_csv = args.train or (data / "train.csv" if args.data and source == "csv" else None)
    params["data"] = recipe_data(params["data"], args.params.resolve().parent, train_csv and train_csv.resolve())
    train = params["data"]["csv"]["path"] if source == "csv" else {source: params["data"][source]}
    named = train if source == "csv" else f"data.{source} ({', '.join(f'{k} {v}' for k, v in train[source].items())})"
    ev = params["evaluate"]
    with tempfile.TemporaryDirectory(prefix="real-zero-shot-") as tmp:
        rows, left_out = training_pairs(params["data"], Path(tmp) / "shard_images")
        if left_out:
            reasons = dict(Counter(item["reason"] for item in left_out).most_common())
            repeats = "duplicate_row: a caption its image already has, nothing lost; " if "duplicate_row" in reasons else ""
            print(f"real_zero_shot: {len(left_out)} items of {named} left out of both sides {reasons} "
                  f"({repeats}first: {left_out[0]})")
        judge = Judge(sets, templates, rows, ev.get("support_weight", 0.0), ev.get("support_temperature", 0.01))
        if args.rescore:
            rescore(args.rescore, result, judge, epochs, params["data"]["background"], args.skip_openclip,
                    args.skip_project)
        else:
            work = args.keep.resolve() if args.keep else Path(tmp) / "work"
            work.mkdir(parents=True, exist_ok=not args.keep)
            if not args.skip_openclip:
                result["open_clip"] = train_open_clip(work / "open_clip", judge, epochs, params["train"]["batch_size"],
                                                      params["data"]["background"], args.openclip_seed)
            if not args.skip_project:
                result["project"] = {"overrides": args.set, **train_project(work / "project", judge, epochs, params)}

    result.pop("data", None)
    used = {"data": str(data)} if not args.eval_sets or (train_csv and not args.train) else {}  # where it named a file
    result.update(machine=device_name(), cpus=os.cpu_count(), **used, train=train, train_pairs=len(rows), train_left_out=left_out, eval_sets={k: str(v) for k, v in paths.items()},
                  templates={"file": str(args.templates), **templates}, total_seconds=round(time.perf_counter() - start, 1))
    ranges = []
    for scores, ratio in (("scores", "top1_ratio_project_over_open_clip"), ("scores_support", "top1_ratio_support")):
        result.pop(ratio, None)
        result.pop(f"{ratio}_range95", None)
        if scores in result.get("open_clip", {}) and scores in result.get("project", {}):
            a, b = result["open_clip"][scores], result["project"][scores]
            result[ratio] = {s: {k: round(b[s][k]["top1"] / a[s][k]["top1"], 3) if a[s][k]["top1"] else None
                                 for k in a[s] if k in b[s]} for s in a if s in b}
            result[f"{ratio}_range95"] = {s: {k: ratio_range(a[s][k], b[s][k]) for k in by} for s, by in result[ratio].items()}
            ranges += [(scores, s, k, r, result[f"{ratio}_range95"][s][k], a[s][k])
                       for s, by in result[ratio].items() for k, r in by.items()]
    write_json(args.out, result)

    print(f"{'side':10} {'scoring':14} {'set':17} {'templates':15} {'top1':>6} {'top5':>6} {'recall':>6}")
    for side in ("open_clip", "project"):
        for scores in ("scores", "scores_support"):
            for s, by_key in result.get(side, {}).get(scores, {}).items():
                for k, m in by_key.items():
                    print(f"{side:10} {scores:14} {s:17} {k:15} {m['top1']:6.3f} {m.get('top5', np.nan):6.3f} "
                          f"{m['mean_per_class_recall']:6.3f}")
    for scores, s, k, r, (lo, hi), a in ranges:
        right = round(a["top1"] * a["n"])
        print(f"project / open_clip top-1, {scores} {s} {k}: {r}x; the 95% intervals of both allow {lo}x to "
              f"{hi if hi is not None else 'any'}x (open_clip: {right} of {a['n']} right, {a['n'] / a['classes']:.1f} by chance)")
    print(f"wrote {args.out} in {result['total_seconds']} s on {result['machine']}")


def ratio_range(a: dict[str, Any], b: dict[str, Any]) -> list[float | None]:
    """[low, high]: b's top-1 over a's at the far ends of their 95% Wilson intervals (scipy's binomtest
    on the count of right answers out of `n`), the range of ratios the two counts allow; high is None
    when a's interval reaches 0. A ratio over a side a few right answers above chance means little:
    this says how little. Conservative: wider than a 95% interval of the ratio itself."""
    def interval(m: dict[str, Any]) -> tuple[float, float]:
        ci = binomtest(round(m["top1"] * m["n"]), m["n"]).proportion_ci(0.95, "wilson")
        return ci.low, ci.high
    (lo_a, hi_a), (lo_b, hi_b) = interval(a), interval(b)
    return [round(lo_b / hi_a, 2), round(hi_b / lo_a, 2) if lo_a > 0 else None]


if __name__ == "__main__":
    main()
