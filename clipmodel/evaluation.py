"""Zero-shot classification of a labelled image set the model never trained on: the paper's evaluation.

The evaluate stage, `clipmodel zeroshot` (torch) and `clip-onnx zeroshot` (onnxruntime) all call
`score`, so the three report the same numbers for the same embeddings. Only numpy here: the caller
brings the encoders as callables, which also lets a benchmark score another project's model with
this very code.

Memory is bounded by chunking: class vectors are built a few classes at a time and logits are
computed for `chunk` images at a time, so 10,000 classes x 100,000 images needs about
chunk x classes floats of scratch beside the [N, D] image and [C, D] class embeddings.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clipmodel.templates import DEFAULT_TEMPLATES
from clipmodel.zeroshot import class_vectors, top_k

if TYPE_CHECKING:
    from clipmodel.support import Support

IMAGE_COLUMNS = ("image", "filepath")  # `filepath` is the column ingest's CSV source reads


class DatasetError(ValueError):
    """A labelled set that cannot be scored; the message names the file and, where there is one, the row.
    A ValueError, so callers that catch bad input generally catch it too."""


@dataclass(frozen=True)
class LabelledSet:
    """Images with one class label each, and the class list zero-shot chooses among.

    Labels are strings, always: `1`, `NA` and `null` are class names, never numbers or missing values.
    """
    name: str
    images: list[Path]
    labels: list[str]
    classnames: list[str]

    @classmethod
    def load(cls, path: str | Path, classnames: Sequence[str] | Mapping[str, str] | str | Path | None = None,
             name: str | None = None) -> LabelledSet:
        """A CSV (columns `image` or `filepath`, and `label`; image paths relative to the CSV) or an
        ImageFolder (one subfolder per class, images anywhere below it).

        `classnames`: the class list in order; or a mapping from each label to the name its prompts
        say, in class order, for labels that are no names (an ImageFolder's `n02099601` or
        `golden_retriever` -> `golden retriever`; the name is then the class everywhere, reports
        included); or a file of either (`read_classnames`). By default the sorted distinct labels.
        Images are not opened here: a bad one is rejected when scored.

        Raises: DatasetError for a missing or unreadable file, missing columns, an empty image path, an
        empty set, an empty or repeating class list (or names), labels outside it (naming the first
        such row), or an ImageFolder's empty class folder when no class list is given (as
        torchvision's ImageFolder).
        """
        path = Path(path)
        if path.is_dir():
            images, labels, rows = _image_folder(path, allow_empty=classnames is not None)
        elif path.is_file():
            images, labels, rows = _labels_csv(path)
        else:
            raise DatasetError(f"{path}: no such file or folder")
        if not images:
            raise DatasetError(f"{path}: no labelled images")
        source = classnames
        if isinstance(classnames, (str, Path)):
            classnames = read_classnames(classnames)
        classes = sorted(set(labels)) if classnames is None else [str(c) for c in classnames]
        if len(set(classes)) != len(classes) or not classes:
            raise DatasetError(f"{path}: the class list is empty or repeats a name")
        known = set(classes)
        missing = [i for i, label in enumerate(labels) if label not in known]
        if missing:
            i, where, named_file = missing[0], "class list", isinstance(source, (str, Path))
            if isinstance(classnames, Mapping):
                where = f"mapping {source}" if named_file else "mapping"
            elif named_file and len(missing) == len(labels):
                where += f" {source} (read as one class per line: a label,name table is a .csv or .tsv)"
            raise DatasetError(f"{path}: {rows[i]}: label {labels[i]!r} is not in the {where} "
                               f"({len(missing)} of {len(labels)} images have labels outside it)")
        if isinstance(classnames, Mapping):
            named = {str(k): str(v) for k, v in classnames.items()}
            labels, classes = [named[label] for label in labels], list(named.values())
            by_name: dict[str, list[str]] = {}
            for label, class_name in named.items():
                by_name.setdefault(class_name, []).append(label)
            twice = next((n for n, given in by_name.items() if len(given) > 1), None)
            if twice is not None:
                raise DatasetError(f"{path}: the mapping gives {twice!r} to labels "
                                   f"{', '.join(map(repr, by_name[twice]))}: they would be one class")
        return cls(name or path.stem, images, labels, classes)

    def targets(self) -> np.ndarray:
        """int64 [N]: each image's index into `classnames`."""
        lookup = {c: i for i, c in enumerate(self.classnames)}
        return np.array([lookup[label] for label in self.labels], dtype=np.int64)


def read_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped: a label file (commas and colons stay inside a label).
    A leading byte-order mark (as Windows editors save UTF-8) is not part of the first name.

    Raises: DatasetError when the file cannot be read or is not UTF-8.
    """
    try:
        return [s.strip() for s in Path(path).read_text(encoding="utf-8-sig").splitlines() if s.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None


def read_classnames(path: str | Path) -> list[str] | dict[str, str]:
    """A class-list file: a .csv or .tsv with columns `label` and `name` is a mapping from label to
    class name (rows in class order); any other file is one class per line (`read_lines`).

    Raises: DatasetError when the file cannot be read, lacks the columns, or repeats a label (naming
    its line)."""
    path = Path(path)
    if path.suffix not in (".csv", ".tsv"):
        return read_lines(path)
    table = _read_table(path)
    if not {"label", "name"} <= set(table.columns):
        raise DatasetError(f"{path}: a class-name table needs columns label and name ({_separator(path)}); "
                           f"has {', '.join(map(repr, table.columns))}")
    repeated = table.label.duplicated()
    if repeated.any():
        line = int(np.flatnonzero(repeated)[0]) + 2
        raise DatasetError(f"{path}: line {line}: label {table.label[line - 2]!r} is given a name twice")
    return dict(zip(table.label, table.name))


def _read_table(path: Path) -> pd.DataFrame:
    """Every cell a string (`1`, `NA` and `null` are labels), tab-separated for a .tsv."""
    tsv = path.suffix == ".tsv"
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, sep="\t" if tsv else ",")
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable {'TSV' if tsv else 'CSV'} ({_separator(path)}): {e}"
                           .replace("\n", " ")) from None


def _separator(path: Path) -> str:
    """What an error about a table says of how it was split: users save a TSV as .csv and the reverse."""
    return f"{'tab' if path.suffix == '.tsv' else 'comma'}-separated, by its suffix"


def _labels_csv(path: Path) -> tuple[list[Path], list[str], list[str]]:
    table = _read_table(path)
    column = next((c for c in IMAGE_COLUMNS if c in table.columns), None)
    if column is None or "label" not in table.columns:
        raise DatasetError(f"{path}: needs columns image (or filepath) and label; has {', '.join(table.columns)}")
    if (table[column] == "").any():
        raise DatasetError(f"{path}: line {int(np.flatnonzero(table[column] == '')[0]) + 2}: empty image path")
    rows = [f"line {i + 2}" for i in range(len(table))]  # line 1 is the header
    return [path.parent / p for p in table[column]], list(table.label), rows


def _image_folder(root: Path, allow_empty: bool) -> tuple[list[Path], list[str], list[str]]:
    """Every file below a class folder is an image of that class, so a file that does not decode is
    rejected and counted when scored, never left out unseen. Hidden files and folders (a leading `.`,
    such as .DS_Store) are not data. Files beside the class folders have no class: a warning names them.
    An empty class folder is an error unless `allow_empty` (an explicit class list says what it is)."""
    visible = lambda p: not any(part.startswith(".") for part in p.relative_to(root).parts)  # noqa: E731
    entries = sorted(p for p in root.iterdir() if visible(p))
    stray = [p.name for p in entries if not p.is_dir()]
    if stray:
        warnings.warn(f"{root}: {len(stray)} file(s) outside the class folders are not scored: "
                      f"{', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''}", stacklevel=3)
    images, labels = [], []
    for folder in (p for p in entries if p.is_dir()):
        files = sorted(f for f in folder.rglob("*") if visible(f) and f.is_file())
        if not files and not allow_empty:
            raise DatasetError(f"{folder}: a class folder with no files; remove it, or give the class list "
                               "(classnames, --classnames) to keep it as a class")
        images += files
        labels += [folder.name] * len(files)
    return images, labels, [str(p) for p in images]


def metrics(top: np.ndarray, targets: np.ndarray, classnames: Sequence[str], confusions: int = 20) -> dict[str, Any]:
    """Accuracy of top-k predictions int [N, k] (class indices, best first) against targets int [N].

    top1, top5 (only with more than 5 classes), mean per-class recall (the mean over classes with images of the
    fraction of each class's images predicted right), n, classes, per-class recall and the most
    frequent (true, predicted) confusions. Accuracies and recalls are fractions in [0, 1].

    Raises: DatasetError when there is nothing to score (N = 0).
    """
    if len(targets) == 0:
        raise DatasetError("no images left to score")
    hit1 = top[:, 0] == targets
    c = len(classnames)
    count = np.bincount(targets, minlength=c)
    right = np.bincount(targets[hit1], minlength=c)
    present = np.flatnonzero(count)
    wrong = targets[~hit1] * c + top[~hit1, 0]
    pairs, n_pairs = np.unique(wrong, return_counts=True)
    worst = np.argsort(-n_pairs, kind="stable")[:confusions]
    return {
        "top1": float(hit1.mean()),
        **({"top5": float((top[:, :5] == targets[:, None]).any(1).mean())} if c > 5 else {}),
        "mean_per_class_recall": float((right[present] / count[present]).mean()),
        "n": int(len(targets)),
        "classes": c,
        "per_class_recall": {classnames[i]: float(right[i] / count[i]) for i in present},
        "most_confused": [{"true": classnames[p // c], "predicted": classnames[p % c], "count": int(m)}
                          for p, m in zip(pairs[worst], n_pairs[worst])],
    }


def zero_shot(image_features: np.ndarray, targets: np.ndarray, classnames: Sequence[str],
              embed_texts: Callable[[list[str]], np.ndarray], templates: Sequence[str],
              class_texts: Sequence[str] | None = None, chunk: int = 1024,
              support: Support | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of the template ensemble, plus top-1 with the first template alone, and the ensemble's
    top-5 predictions int64 [N, min(5, C)]. Features [N, D] need not be normalised; targets are int
    class indices [N]. `class_texts` fill the templates' `{}` where they differ from the names
    reported (default: the class names). No templates means DEFAULT_TEMPLATES. `support` adds its
    training images to every class vector (clipmodel.support), single-template ones too; with a
    positive weight, `top1_without_support` gives the ensemble's top-1 without them.

    Raises: DatasetError when there is nothing to score (N = 0).
    """
    templates = list(templates) or list(DEFAULT_TEMPLATES)
    texts = list(class_texts or classnames)

    with_support = support.apply if support else (lambda v: v)  # noqa: E731
    ensemble = class_vectors(embed_texts, texts, templates)
    top = top_k(image_features, with_support(ensemble), 5, chunk)
    result = metrics(top, targets, classnames)
    single = top if len(templates) == 1 else top_k(
        image_features, with_support(class_vectors(embed_texts, texts, templates[:1])), 1, chunk)
    result["top1_single_template"] = float((single[:, 0] == targets).mean())
    if support and support.weight:  # the paper's zero-shot beside it, so the support's share shows
        plain = top_k(image_features, ensemble, 1, chunk)
        result["top1_without_support"] = float((plain[:, 0] == targets).mean())
    result["templates"] = len(templates)
    return result, top


def embed_images(paths: Sequence[Path], load_image: Callable[[Path], Any],
                 embed_batch: Callable[[list[Any]], np.ndarray], batch_size: int = 256,
                 progress: Callable[[Any], Any] = lambda it: it) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """`embed_batch`'s outputs for the images that load, concatenated (e.g. [M, D] embeddings; float32
    [0, 0] when none loads), their positions int64 [M] in `paths`, and the rest with a reason.

    Anything that goes wrong decoding one image (a missing file, a corrupt PNG, a decoder's own
    ValueError) rejects that image, never the run.
    """
    feats, kept, rejected = [], [], []
    for start in progress(range(0, len(paths), batch_size)):
        batch = []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                batch.append(load_image(paths[i]))
                kept.append(i)
            except Exception as e:  # noqa: BLE001 - one bad file is a rejection, whatever the decoder raised
                rejected.append({"image": str(paths[i]), "reason": str(e) or type(e).__name__})
        if batch:
            feats.append(np.asarray(embed_batch(batch)))
    return (np.concatenate(feats) if feats else np.empty((0, 0), np.float32)), np.array(kept, np.int64), rejected


def embed_set(ds: LabelledSet, load_image: Callable[[Path], Any], embed_images_batch: Callable[[list[Any]], np.ndarray],
              batch_size: int = 256, progress: Callable[[Any], Any] = lambda it: it,
              ) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """`embed_images` over a labelled set's images: features [M, D], their positions int64 [M] in
    `ds.images`, and the undecodable ones with a reason; once per set, whatever is scored after.

    Raises: DatasetError when no image of the set could be decoded.
    """
    feats, kept, rejected = embed_images(ds.images, load_image, embed_images_batch, batch_size, progress)
    if len(kept) == 0:
        raise DatasetError(f"{ds.name}: none of its {len(ds.images)} images could be decoded "
                           f"(first: {rejected[0]['image']}: {rejected[0]['reason']})")
    return feats, kept, rejected


def score(ds: LabelledSet, load_image: Callable[[Path], Any], embed_images_batch: Callable[[list[Any]], np.ndarray],
          embed_texts: Callable[[list[str]], np.ndarray], templates: Sequence[str] = DEFAULT_TEMPLATES,
          batch_size: int = 256, progress: Callable[[Any], Any] = lambda it: it,
          support: Support | None = None) -> dict[str, Any]:
    """Zero-shot metrics of a labelled set (see `metrics`; `support` as in `zero_shot`), with `rejected`
    (count) and `rejected_images`,
    and for plots the positions of the scored images in `ds.images` (`kept`, int64 [M]) and their top-5
    (`predictions`, int64 [M, min(5, C)]).

    Raises: DatasetError when no image of the set could be decoded.
    """
    feats, kept, rejected = embed_set(ds, load_image, embed_images_batch, batch_size, progress)
    result, top = zero_shot(feats, ds.targets()[kept], ds.classnames, embed_texts, templates, support=support)
    return {**result, "rejected": len(rejected), "rejected_images": rejected, "kept": kept, "predictions": top}
