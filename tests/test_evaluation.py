"""Zero-shot on held-out labelled sets: loading (CSV, ImageFolder, string labels), the metrics, and the
evaluate stage and both CLIs scoring the same set to the same numbers."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from clipmodel.evaluation import DatasetError, LabelledSet, metrics, score
from clipmodel.zeroshot import top_k, unit
from conftest import ROOT, run_stage, stage_env
from pipeline.export import SYNTHETIC_DATA, training_data
from pipeline.params import load_params

COLOURS = {"1": (220, 30, 30), "NA": (30, 30, 220), "null": (30, 200, 30)}  # labels that pandas would not keep


def write_set(folder, per_class: int = 3, broken: bool = True) -> tuple:
    """A CSV set and the same images as an ImageFolder; the CSV also lists one undecodable file."""
    rows = []
    for label, colour in COLOURS.items():
        (folder / "tree" / label).mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("RGBA", (40 + 7 * i, 32), (0, 0, 0, 0))  # transparent, non-square
            img.paste(colour + (255,), (4 + i, 4, 28, 28))
            img.save(folder / "tree" / label / f"{i}.png")
            rows.append((f"tree/{label}/{i}.png", label))
    if broken:
        (folder / "broken.png").write_bytes(b"not a png")
        rows.append(("broken.png", "1"))
    lines = ["image,label"] + [f"{p},{label}" for p, label in rows]
    (folder / "set.csv").write_text("\n".join(lines) + "\n")
    return folder / "set.csv", folder / "tree"


def test_labels_stay_strings_and_classes_default_to_sorted_labels(tmp_path):
    csv_path, tree = write_set(tmp_path)
    ds = LabelledSet.load(csv_path)
    assert ds.classnames == ["1", "NA", "null"] and ds.name == "set"
    assert ds.labels[:3] == ["1"] * 3 and len(ds.images) == 10
    folder = LabelledSet.load(tree, name="tree")
    assert folder.classnames == ["1", "NA", "null"] and len(folder.images) == 9
    assert folder.targets().tolist() == [0] * 3 + [1] * 3 + [2] * 3


def test_image_folder_counts_every_file_and_names_what_it_cannot_score(tmp_path):
    _, tree = write_set(tmp_path, broken=False)
    (tree / "1" / "notes.txt").write_text("not an image")       # a class's file: an image that will not decode
    (tree / "1" / ".DS_Store").write_bytes(b"\0")                # hidden: not data
    (tree / ".cache").mkdir()
    (tree / "stray.png").write_bytes(b"")                        # beside the class folders: no class
    with pytest.warns(UserWarning, match="1 file.* outside the class folders are not scored: stray.png"):
        ds = LabelledSet.load(tree)
    assert ds.classnames == ["1", "NA", "null"] and len(ds.images) == 10 and tree / "1" / "notes.txt" in ds.images
    (tree / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: a class folder with no files"):
        LabelledSet.load(tree)
    ds = LabelledSet.load(tree, ["1", "NA", "null", "empty"])   # an explicit class list keeps it, as a class
    assert ds.classnames[-1] == "empty" and len(ds.images) == 10


def test_classnames_from_file_with_commas_and_filepath_column(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "set.csv").write_text('filepath,label\na.png,"family: man, girl"\n')
    (tmp_path / "classes.txt").write_text("\ufefffamily: man, girl\r\nother\r\n", encoding="utf-8")  # as Notepad saves
    ds = LabelledSet.load(tmp_path / "set.csv", tmp_path / "classes.txt")
    assert ds.classnames == ["family: man, girl", "other"] and ds.targets().tolist() == [0]


def test_names_for_folder_labels_become_the_classes(tmp_path):
    """ImageFolder labels are folder names (n02099601, golden_retriever): a mapping, in params or a
    .csv/.tsv of label,name, gives the name prompted and reported for each, in the mapping's order."""
    _, tree = write_set(tmp_path, broken=False)
    names = {"null": "green square", "1": "red square", "NA": "blue square", "unused": "purple square"}
    ds = LabelledSet.load(tree, names)
    assert ds.classnames == list(names.values()) and ds.labels[:3] == ["red square"] * 3
    assert ds.targets().tolist() == [1] * 3 + [2] * 3 + [0] * 3
    (tmp_path / "names.tsv").write_text("label\tname\n" + "".join(f"{k}\t{v}\n" for k, v in names.items()))
    assert LabelledSet.load(tree, tmp_path / "names.tsv") == ds
    table = tmp_path / "names.csv"
    for text, message in (("label,name\n1,red\nNA,blue\n", f"label 'null' is not in the mapping {table}"),
                          ("label,name\n1,red\nNA,red\nnull,green\n", "gives 'red' to labels '1', 'NA': they would be one"),
                          ("label,name\n1,red\nNA,blue\n1,green\n", "line 4: label '1' is given a name twice"),
                          ("folder,name\n1,red\n", "needs columns label and name"),
                          ("label\tname\n1\tred, square\n", r"\(comma-separated, by its suffix\); has 'label\\tname'")):
        table.write_text(text)
        with pytest.raises(DatasetError, match=message):
            LabelledSet.load(tree, table)
    (tmp_path / "names.txt").write_text(table.read_text())  # a table saved under another suffix
    with pytest.raises(DatasetError, match=r"names.txt \(read as one class per line: a label,name table is a .csv"):
        LabelledSet.load(tree, tmp_path / "names.txt")


@pytest.mark.parametrize("content, message", [
    ("image,label\na.png,cat\nb.png,dog\n", "line 3: label 'dog' is not in the class list"),
    ("picture,label\na.png,cat\n", "needs columns image (or filepath) and label"),
    ("image,label\n", "no labelled images"),
])
def test_bad_sets_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "set.csv").write_text(content)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        LabelledSet.load(tmp_path / "set.csv", ["cat"] if "dog" in content else None)
    assert "\n" not in str(e.value)


def test_metrics_hand_checked():
    classes = ["a", "b", "c", "d", "e", "f"]
    targets = np.array([0, 0, 1, 1, 2, 2])
    top = np.array([[0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [0, 1, 2, 3, 4], [0, 2, 3, 4, 5],
                    [2, 0, 1, 3, 4], [5, 4, 3, 1, 0]])
    m = metrics(top, targets, classes)
    assert m["top1"] == pytest.approx(2 / 6) and m["top5"] == pytest.approx(4 / 6)
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 0 + 0.5) / 3)
    assert m["per_class_recall"] == {"a": 0.5, "b": 0.0, "c": 0.5}  # classes without images are not listed
    assert m["most_confused"][0] == {"true": "b", "predicted": "a", "count": 2}
    assert m["n"] == 6 and m["classes"] == 6


def test_top_k_chunked_equals_full_and_is_sorted():
    rng = np.random.default_rng(0)
    images, classes = rng.normal(size=(50, 8)), unit(rng.normal(size=(30, 8)))
    full = np.argsort(-(unit(images) @ classes.T), axis=1)[:, :5]
    assert (top_k(images, classes, 5, chunk=7) == full).all()


def test_score_counts_undecodable_images_and_never_fails_on_them(tmp_path):
    csv_path, _ = write_set(tmp_path)
    ds = LabelledSet.load(csv_path)

    def load(path):
        return np.asarray(Image.open(path).convert("RGBA"))[8, 8, :3].astype(np.float32)  # the paste colour

    r = score(ds, load, np.stack, lambda texts: np.array([COLOURS[t] for t in texts], np.float32), ["{}"])
    assert r["rejected"] == 1 and r["rejected_images"][0]["image"].endswith("broken.png")
    assert r["n"] == 9 and r["top1"] == 1.0 and r["top1_single_template"] == 1.0


def run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=stage_env(cwd), capture_output=True, text=True)


@pytest.mark.slow
def test_evaluate_stage_and_both_clis_score_held_out_sets_alike(workspace):
    csv_path, tree = write_set(workspace / "heldout")
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["evaluate"]["templates"] = str(ROOT / "templates/prompts.yaml")
    named = {"1": "red square", "NA": "blue square", "null": "green square"}  # names for the folder labels
    params["evaluate"]["datasets"] = {"colours": {"path": str(csv_path), "templates": "label"},
                                      "tree": {"path": str(tree), "classnames": named}}
    params["evaluate"]["support_weight"] = 1.0  # the CLIs take it from the bank evaluate writes
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage(workspace, "train")
    out = run_stage(workspace, "evaluate").stdout
    assert "1 undecodable image(s)" in out
    zs = json.loads((workspace / "reports/metrics.json").read_text())["zero_shot"]
    assert zs["colours"]["n"] == 9 and zs["colours"]["rejected"] == 1 and zs["colours"]["classes"] == 3
    assert zs["tree"]["n"] == 9 and zs["shape"]["n"] > 0  # the synthetic tasks stay
    per_class = json.loads((workspace / "reports/per_class.json").read_text())
    assert set(per_class["colours"]["recall"]) <= set(COLOURS) and set(per_class["tree"]["recall"]) <= set(named.values())

    label = workspace / "label.txt"
    label.write_text("{}\n")
    assert run("-m", "clipmodel.export", "--model", "models", "--out", "onnx", "--training-data",
               "my photos (CC0)", cwd=workspace).returncode == 0
    assert (workspace / "onnx/support.safetensors").is_file()
    assert "pipeline on: my photos (CC0); data fingerprint" in (workspace / "onnx/MODEL.md").read_text()
    for cli, model in (("clipmodel.cli", "models"), ("clipmodel.runtime_cli", "onnx")):
        proc = run("-m", cli, "zeroshot", "--model", model, str(csv_path), "--templates", str(label),
                   "--json", f"{model}.json", "--name", "colours", cwd=workspace)  # keyed as evaluate keys it
        assert proc.returncode == 0, proc.stderr
        got = json.loads((workspace / f"{model}.json").read_text())["colours"]
        for key in ("top1", "top1_single_template", "top1_without_support", "mean_per_class_recall", "n",
                    "rejected"):
            assert got[key] == pytest.approx(zs["colours"][key], abs=1e-9), (cli, key)
        assert "broken.png" in proc.stdout
    (workspace / "names.csv").write_text("label,name\n" + "".join(f"{k},{v}\n" for k, v in named.items()))
    proc = run("-m", "clipmodel.runtime_cli", "zeroshot", "--model", "onnx", str(tree), "--classnames", "names.csv",
               "--json", "tree.json", "--name", "tree", cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((workspace / "tree.json").read_text())["tree"]
    assert got["classes"] == 3 and got["top1"] == pytest.approx(zs["tree"]["top1"], abs=1e-9)
    bad = run("-m", "clipmodel.cli", "zeroshot", "--model", "models", str(tree), "--labels-file", str(label),
              cwd=workspace)
    assert bad.returncode == 1 and "is not in the class list" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_all_data_in_training_then_evaluate_and_export_on_held_out_sets(tiny_data, tmp_path):
    """data.val_fraction = test_fraction = 0: no test split, so evaluate scores the held-out sets and
    skips retrieval with a line; export checks parity on what exists and ranks by the set's top-1."""
    import shutil
    shutil.copy(tiny_data / "params.yaml", tmp_path / "params.yaml")
    csv_path, _ = write_set(tmp_path / "heldout", broken=False)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["data"].update(val_fraction=0.0, test_fraction=0.0)
    params["evaluate"].update(templates=str(ROOT / "templates/prompts.yaml"), datasets={"colours": {"path": str(csv_path)}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("ingest", "tokenize", "train"):
        run_stage(tmp_path, stage)
    out = run_stage(tmp_path, "evaluate").stdout
    assert "retrieval and the linear probe are skipped" in out
    metrics_json = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert "retrieval" not in metrics_json and metrics_json["zero_shot"]["colours"]["n"] == 9
    out = run_stage(tmp_path, "export").stdout
    assert "by zero_shot.colours.top1" in out
    report = json.loads((tmp_path / "reports/export.json").read_text())
    assert report["onnx_top1"]["colours"] == report["torch_top1"]["colours"]
    int8, sizes = report["int8"], report["int8"]["bytes"]  # the rule that published int8 (or not) is on file
    assert int8["size_ratio"] == pytest.approx(sum(v for k, v in sizes.items() if k.endswith("int8"))
                                               / sum(v for k, v in sizes.items() if k.endswith("fp32")))
    assert f"rule met: {int8['rule_met']}" in out and (not int8["published"] or int8["rule_met"] != "neither")
    assert "zero_shot.colours.top1" in json.dumps(report["registry"]) or report["registry"]
    # the card says what each held-out figure was measured on, with and without the support set
    card = (tmp_path / "models/onnx/MODEL.md").read_text()
    assert f"- colours: `{csv_path}`, 9 images, 3 classes (its sorted distinct labels)" in card
    assert "- zero_shot.colours.top1: " in card
    assert ("- zero_shot.colours.top1_without_support: " in card) == ("top1_without_support" in
                                                                      metrics_json["zero_shot"]["colours"])
    assert "pipeline on: synthetic scenes drawn and captioned by the ingest stage (clipmodel/synthetic.py), generated" in card
    assert ("## int8 variant" in card) == int8["published"]
    if int8["published"]:  # the int8 folder gives its own top-1
        top1 = int8["top1"]["colours"]
        assert f"- colours: {top1:.4f} (float32 " in (tmp_path / "models/onnx/int8/MODEL.md").read_text()
        assert f"- colours: {top1:.4f} (float32 " in card.split("## int8 variant")[1]  # and beside the float figures


def test_the_model_card_names_the_training_data_and_its_licence():
    """export.dataset and export.dataset_license go into MODEL.md; unset, the synthetic scenes are still
    named, and any other data is said to be undescribed rather than mislabelled."""
    real = load_params(ROOT / "real/params.yaml")
    assert training_data(real).startswith("OpenMoji 17.0.0 emoji") and "; licence: CC BY-SA 4.0" in training_data(real)
    default = load_params(ROOT / "params.yaml")
    assert training_data(default) == SYNTHETIC_DATA
    unnamed = real.model_copy(update={"export": real.export.model_copy(update={"dataset": None})})
    assert training_data(unnamed) is None


def test_every_pipelines_held_out_sets_are_deps_of_its_evaluate_stage():
    """A changed label file or image must rerun evaluate: each evaluate.datasets path is a dep."""
    checked = 0
    for dvc_file in (ROOT / "dvc.yaml", ROOT / "real" / "dvc.yaml"):
        stage = yaml.safe_load(dvc_file.read_text())["stages"]["evaluate"]
        params = yaml.safe_load((dvc_file.parent / "params.yaml").read_text())
        for name, spec in (params["evaluate"].get("datasets") or {}).items():
            assert spec["path"] in stage["deps"], (dvc_file, name)
            checked += 1
    assert checked >= 2  # the real pipeline's two sets


@pytest.mark.parametrize("counts, says_ties", [([3, 1], False), ([1, 1], True)])
def test_top_confusions_plot_counts_whole_images_and_says_when_no_pair_repeats(tmp_path, monkeypatch, counts, says_ties):
    """With one image per class (a labelled set of many classes) every confusion happens once, and the
    "most frequent" bars are ties: the title says so, and the axis counts whole images."""
    import matplotlib.image
    from pipeline import plots

    pairs = [{"true": f"class {i}", "predicted": f"class {i + 1}", "count": c} for i, c in enumerate(counts)]
    scored = plots.Scored("set", [f"class {i}" for i in range(50)], np.zeros(4, np.int64), np.zeros((4, 1), np.int64),
                          {"most_confused": pairs}, lambda rows: np.zeros((len(rows), 8, 8, 3), np.uint8))
    axes = []
    save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: (axes.append(fig.axes[0]), save(fig, path))[1])
    assert matplotlib.image.imread(plots.top_confusions(tmp_path / "confusions.png", scored)).size
    assert ("no pair repeats" in axes[0].get_title()) == says_ties and "50 classes" in axes[0].get_title()
    assert all(float(t).is_integer() for t in axes[0].get_xticks())


def test_similarity_plot_labels_columns_with_the_captions_as_written_and_has_a_colour_bar(tmp_path, monkeypatch):
    """Column labels are the manifest's captions (case kept, long ones cut with an ellipsis), not
    the tokens decoded; the colour bar says what the colours measure."""
    import pandas as pd
    from types import SimpleNamespace
    from pipeline import plots

    captions = [["A Grinning Face (cheerful)"], ["x" * 60, "second caption"], ["Red Circle"]]
    corpus = SimpleNamespace(manifest=pd.DataFrame({"captions": captions}), caption_start=np.array([0, 1, 3]))
    test = np.array([2, 1])
    feats = np.eye(4, dtype=np.float32)
    figures = []
    save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    plots.test_similarity(tmp_path / "similarity.png", corpus, test, feats[:2], feats, np.array([3, 1, 2, 0]))
    heat, bar = figures[0].axes
    assert [t.get_text() for t in heat.get_xticklabels()] == ["Red Circle", "x" * 39 + "…"]
    assert bar.get_ylabel() == "cosine similarity"
    assert (tmp_path / "similarity.png").stat().st_size
