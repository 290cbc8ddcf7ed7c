"""benchmarks/real_zero_shot.py: which rows and sets both sides get (the training itself is the benchmark's)."""
from __future__ import annotations

import json
import os
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipmodel.zeroshot import unit
from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.real_zero_shot import (eval_set_paths, load_sets, ratio_range, recipe_data, run_logged,  # noqa: E402
                                       training_pairs)
from conftest_ingest_helpers import add_member, encode, noise  # noqa: E402

TSV = {"image_column": "filepath", "caption_column": "title", "sep": "\t", "quoting": "auto"}


def csv_recipe(section: dict, path) -> dict:
    return {"source": "csv", "csv": {**section, "path": str(path)}}


def png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


def test_a_long_run_shows_its_latest_line_and_a_failure_its_log(tmp_path, capsys):
    steps = "import time\nfor i in range(3):\n    print(f'step {i}')\n    time.sleep(0.05)\n"
    run_logged([sys.executable, "-c", steps], tmp_path, dict(os.environ), tmp_path / "a.log", every=0.0)
    assert (tmp_path / "a.log").read_text() == "step 0\nstep 1\nstep 2\n"
    assert capsys.readouterr().out.splitlines() == [f"  {tmp_path.name}/a.log | step {i}" for i in range(3)]
    run_logged([sys.executable, "-c", steps], tmp_path, dict(os.environ), tmp_path / "b.log")  # at most once a minute
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit, match=r"failed \(3\)") as e:
        run_logged([sys.executable, "-c", "import sys; print('no such set'); sys.exit(3)"], tmp_path, dict(os.environ),
                   tmp_path / "c.log")
    assert str(e.value).endswith("c.log:\nno such set")


def test_training_pairs_read_as_ingest_reads_and_leave_out_what_it_refuses(tmp_path):
    png(tmp_path / "img" / "a.png")
    png(tmp_path / "img" / "b.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "pairs.tsv").write_text(
        "filepath\ttitle\n"
        'img/a.png\t"Casablanca" poster, 1942\n'    # a tab-separated file: quotes are text
        "img/b.png\n"                                # one field: a malformed row
        "img/broken.png\ta broken file\n"
        "img/b.png\t  a second caption  \n")
    rows, left_out = training_pairs(csv_recipe(TSV, tmp_path / "pairs.tsv"), tmp_path / "scratch")
    assert rows["caption"].tolist() == ['"Casablanca" poster, 1942', "a second caption"]
    assert rows["filepath"].tolist() == [str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "b.png")]
    assert [(r["where"].rsplit(":", 1)[-1], r["reason"].split(":")[0]) for r in left_out] == [
        ("line 3", "malformed_row"), ("line 4", "not_an_image")]


def test_coco_and_webdataset_recipes_give_one_pair_per_caption(tmp_path):
    """Both sides train on what ingest reads of a COCO file and of shards: every caption of an image is
    a row; images inside shards become files open_clip's CSV loader can open."""
    png(tmp_path / "coco" / "images" / "1.png")
    (tmp_path / "coco" / "captions.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "missing.png"}],
        "annotations": [{"image_id": 1, "caption": "a dark square"}, {"image_id": 1, "caption": "black"},
                        {"image_id": 2, "caption": "nothing there"}]}))
    data = recipe_data({"source": "coco", "coco": {"annotations": "coco/captions.json", "images": "coco/images"}},
                       tmp_path, None)
    assert data["coco"]["annotations"] == str(tmp_path / "coco" / "captions.json")  # relative to the params file
    rows, left_out = training_pairs(data, tmp_path / "scratch")
    assert sorted(rows["caption"]) == ["a dark square", "black"]
    assert set(rows["filepath"]) == {str(tmp_path / "coco" / "images" / "1.png")}
    assert len(left_out) == 1 and left_out[0]["where"].endswith("captions.json:image 2")

    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for key, seed in (("a", 1), ("b", 2)):
            add_member(tar, f"{key}.png", encode(noise(seed)))
            add_member(tar, f"{key}.txt", f"caption {key}".encode())
        add_member(tar, "c.png", b"not a png")
        add_member(tar, "c.txt", b"broken")
    rows, left_out = training_pairs(recipe_data({"source": "webdataset", "webdataset": {"shards": "shard-*.tar"}},
                                                tmp_path, None), tmp_path / "scratch")
    assert rows["caption"].tolist() == ["caption a", "caption b"] and len(left_out) == 1
    assert [np.asarray(Image.open(p)).shape for p in rows["filepath"]] == [(16, 24, 3)] * 2
    assert all(p.startswith(str(tmp_path / "scratch")) for p in rows["filepath"])


def test_recipe_data_refuses_what_it_cannot_train_on(tmp_path):
    with pytest.raises(SystemExit, match="--train names a training CSV, but the recipe's data.source is coco"):
        recipe_data({"source": "coco", "coco": {"annotations": "a.json", "images": "img"}}, tmp_path, tmp_path / "t.csv")
    with pytest.raises(SystemExit, match="data.source is synthetic"):
        recipe_data({"source": "synthetic"}, tmp_path, None)
    with pytest.raises(SystemExit, match="no data.folder.path"):
        recipe_data({"source": "folder", "folder": {}}, tmp_path, None)
    assert recipe_data({"source": "csv", "csv": {"path": "x.csv"}}, tmp_path, tmp_path / "t.csv")["csv"]["path"] == \
        str(tmp_path / "t.csv")


def test_training_csv_without_the_recipes_columns_is_a_one_line_error(tmp_path):
    (tmp_path / "train.csv").write_text("image,text\na.png,a cat\n")
    with pytest.raises(SystemExit, match=r"train.csv: no column 'filepath', 'title'"):
        training_pairs(csv_recipe({**TSV, "sep": ","}, tmp_path / "train.csv"), tmp_path / "scratch")


def test_eval_sets_default_to_the_folders_eval_csvs_or_are_named(tmp_path):
    for name in ("eval_unseen.csv", "eval_cross_style.csv", "train.csv"):
        (tmp_path / name).write_text("image,label\n")
    assert list(eval_set_paths(tmp_path, [])) == ["eval_cross_style", "eval_unseen"]
    (tmp_path / "pets").mkdir()
    assert eval_set_paths(tmp_path, [f"pets={tmp_path / 'pets'}"]) == {"pets": tmp_path / "pets"}
    with pytest.raises(SystemExit, match="pets given twice"):
        eval_set_paths(tmp_path, [f"pets={tmp_path / 'pets'}", f"pets={tmp_path / 'pets'}"])
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        eval_set_paths(tmp_path, ["pets"])
    with pytest.raises(SystemExit, match="birds: .*birds.csv not found"):
        eval_set_paths(tmp_path, [f"birds={tmp_path / 'birds.csv'}"])
    with pytest.raises(SystemExit, match="no eval_\\*.csv"):
        eval_set_paths(tmp_path / "pets", [])


def test_a_set_that_cannot_be_scored_stops_the_run_before_any_training(tmp_path):
    png(tmp_path / "img" / "a.png")
    (tmp_path / "good.csv").write_text("image,label\nimg/a.png,cat\n")
    (tmp_path / "bad.csv").write_text("path,class\nimg/a.png,cat\n")
    sets = load_sets({"good": tmp_path / "good.csv"})
    assert sets["good"].name == "good" and sets["good"].classnames == ["cat"]
    with pytest.raises(SystemExit, match=r"^real_zero_shot: .*bad.csv: needs columns image \(or filepath\) and label"):
        load_sets({"good": tmp_path / "good.csv", "bad": tmp_path / "bad.csv"})
    # a class list, as evaluate.datasets' classnames: classes without images count, a label outside it is an error
    (tmp_path / "classes.txt").write_text("dog\ncat\nbird\n")
    assert load_sets({"good": tmp_path / "good.csv"}, {"good": tmp_path / "classes.txt"})["good"].classnames == [
        "dog", "cat", "bird"]
    with pytest.raises(SystemExit, match="--classnames goood: no held-out set of that name"):
        load_sets({"good": tmp_path / "good.csv"}, {"goood": tmp_path / "classes.txt"})
    (tmp_path / "classes.txt").write_text("dog\n")
    with pytest.raises(SystemExit, match="cat"):
        load_sets({"good": tmp_path / "good.csv"}, {"good": tmp_path / "classes.txt"})


def test_the_judge_scores_both_ways_with_the_same_rows_and_support_settings(tmp_path):
    """Support-set scores come from the side's own embeddings of the training rows; weight 0 gives the
    paper's zero-shot alone. Four classes: no top-5 to report, which is no error."""
    import pandas as pd

    from benchmarks.real_zero_shot import Judge
    from clipmodel.evaluation import LabelledSet, score
    from clipmodel.support import Support

    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "grey": (120, 120, 120)}
    for name, rgb in colours.items():
        Image.new("RGB", (8, 8), rgb).save(tmp_path / f"{name}.png")
    (tmp_path / "set.csv").write_text("image,label\n" + "".join(f"{n}.png,{n}\n" for n in colours))
    ds = LabelledSet.load(tmp_path / "set.csv", name="colours")
    rows = pd.DataFrame({"filepath": [str(tmp_path / f"{n}.png") for n in colours],
                         "caption": ["a red thing", "a blue thing", "a green one", "grey"]})
    rng = np.random.default_rng(0)
    words = {}
    embed_texts = lambda texts: np.stack([sum(words.setdefault(w, rng.normal(size=6)) for w in t.split())  # noqa: E731
                                          for t in texts]).astype(np.float32)
    embed_images = lambda batch: np.stack([np.r_[np.asarray(b, np.float32).mean((0, 1)), 0, 0, 0]  # noqa: E731
                                           for b in batch])
    load = lambda p: np.asarray(Image.open(p))  # noqa: E731
    templates = {"label": ["{}"], "thing": ["{}", "a {} thing"]}
    plain = Judge({"colours": ds}, templates, rows, 0.0, 0.01)(load, embed_images, embed_texts)
    assert set(plain) == {"scores"}
    seen = {"images": 0, "texts": []}

    def counted_images(batch: list) -> np.ndarray:
        seen["images"] += len(batch)
        return embed_images(batch)

    def counted_texts(texts: list[str]) -> np.ndarray:
        seen["texts"] += texts
        return embed_texts(texts)
    both = Judge({"colours": ds}, templates, rows, 2.0, 0.05)(load, counted_images, counted_texts)
    # Each image once (the set's four, the bank's four), each prompt and caption once, for both scorings.
    prompts = {t.format(c) for c in colours for t in ("{}", "a {} thing")}
    assert seen["images"] == 8 and len(seen["texts"]) == len(set(seen["texts"]))
    assert set(seen["texts"]) == prompts | set(rows["caption"])
    assert both["scores"] == plain["scores"] and both["support"] == {"weight": 2.0, "temperature": 0.05}
    bank = Support(unit(embed_images([load(p) for p in rows["filepath"]])), unit(embed_texts(list(rows["caption"]))),
                   np.arange(4), 2.0, 0.05)
    expected = score(ds, load, embed_images, embed_texts, ["{}"], support=bank)
    assert both["scores_support"]["colours"]["label"]["top1"] == expected["top1"]


def test_a_run_on_other_inputs_never_writes_the_committed_result(tmp_path):
    import argparse

    from benchmarks.real_zero_shot import ROOT as BENCH_ROOT
    from benchmarks.real_zero_shot import default_out

    def out(**kw: object) -> str:
        return default_out(argparse.Namespace(**{"params": BENCH_ROOT / "real" / "params.yaml", "data": None,
                                                 "train": None, "eval_sets": [], **kw})).name
    (tmp_path / "pets").mkdir()
    assert default_out(argparse.Namespace(params=BENCH_ROOT / "real" / ".." / "real" / "params.yaml", data=None,
                                          train=None, eval_sets=[])) == BENCH_ROOT / "reports/benchmarks/real_zero_shot.json"
    assert out(params=tmp_path / "mydata" / "params.yaml", eval_sets=["pets=/x.csv", "styles=/y"]) == \
        "real_zero_shot_mydata_pets_styles.json"
    assert out(data=tmp_path / "pets", train=tmp_path / "pairs.tsv") == "real_zero_shot_pets_pairs.json"


def test_both_sides_train_on_the_recipes_own_data_unless_told_otherwise(tmp_path, monkeypatch):
    """main() with both sides skipped: which training data a CSV recipe gets by default (its own
    data.csv.path, relative to the params file), with --data DIR (DIR/train.csv) and with --train."""
    import json as json_
    import yaml

    from benchmarks import real_zero_shot

    for folder, n in (("mine", 2), ("other", 3)):
        for i in range(n):
            png(tmp_path / folder / f"{i}.png")
        (tmp_path / folder / "train.csv").write_text("filepath,caption\n" + "".join(f"{i}.png,thing {i}\n" for i in range(n)))
    (tmp_path / "other" / "eval_x.csv").write_text("image,label\n0.png,a\n1.png,b\n")
    params = yaml.safe_load((ROOT / "real" / "params.yaml").read_text())
    params["data"]["csv"] = {**params["data"]["csv"], "path": "mine/train.csv"}  # relative to the params file
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    def run(*argv: str) -> dict:
        out = tmp_path / "out.json"
        out.unlink(missing_ok=True)
        monkeypatch.setattr(sys, "argv", ["real_zero_shot.py", "--params", str(tmp_path / "params.yaml"), "--skip-openclip",
                                          "--skip-project", "--template-keys", "label", "--out", str(out), *argv])
        real_zero_shot.main()
        return json_.loads(out.read_text())

    eval_set = f"x={tmp_path / 'other' / 'eval_x.csv'}"
    assert run("--eval-set", eval_set)["train"] == str(tmp_path / "mine" / "train.csv")
    result = run("--data", str(tmp_path / "other"))
    assert (result["train"], result["train_pairs"], result["data"]) == (
        str(tmp_path / "other" / "train.csv"), 3, str(tmp_path / "other"))
    assert run("--eval-set", eval_set, "--train", str(tmp_path / "other" / "train.csv"))["train_pairs"] == 3


@pytest.mark.slow
def test_the_project_side_trains_in_its_scratch_copy_with_the_recipes_held_out_paths_unresolved(tmp_path):
    """real/params.yaml names its held-out sets relative to real/; the scratch copy the project side
    trains in is elsewhere, and the Judge, not the evaluate stage, scores them."""
    import pandas as pd
    import yaml

    from benchmarks.real_zero_shot import Judge, recipe_data, train_project
    from clipmodel.evaluation import LabelledSet
    from conftest import TINY, merge

    for i in range(48):
        noise(i).save(tmp_path / f"{i}.png")
    noise(0).save(tmp_path / "48.png")  # pixel-identical to 0.png: ingest merges it, and the result says so
    (tmp_path / "train.csv").write_text("filepath,caption\n" + "".join(f"{i}.png,thing {i % 6} (tag {i})\n" for i in range(49)))
    (tmp_path / "set.csv").write_text("image,label\n" + "".join(f"{i}.png,thing {i % 6}\n" for i in range(6)))
    params = yaml.safe_load((ROOT / "real" / "params.yaml").read_text())
    params = merge(params, {k: TINY[k] for k in ("model", "tokenize")} | {
        "model": {**TINY["model"], "vision": "resnet", "vision_layers": [1, 1, 1, 1], "vision_width": 8, "ensemble": 1},
        "data": {"image_size": 32, "workers": 1}, "train": {"batch_size": 16, "ssl_weight": 0.0}})
    assert not (tmp_path / "work" / params["evaluate"]["datasets"]["unseen"]["path"]).exists()  # ../../shared/...
    params["data"] = recipe_data({**params["data"], "csv": {**params["data"]["csv"], "path": "train.csv"}}, tmp_path, None)
    rows = pd.DataFrame({"filepath": [str(tmp_path / f"{i}.png") for i in range(48)],
                         "caption": [f"thing {i % 6} (tag {i})" for i in range(48)]})
    judge = Judge({"set": LabelledSet.load(tmp_path / "set.csv", name="set")}, {"label": ["{}"]}, rows, 1.0, 0.01)
    result = train_project(tmp_path / "work", judge, 1, params)
    assert result["epochs"] == 1 and result["steps"] == 3 and result["scores"]["set"]["label"]["n"] == 6
    assert (result["images"], result["duplicates_merged"], result["rows_merged"]) == (48, 1, 0)
    assert "scores_support" in result and params["train"]["epochs"] == 30  # the caller's recipe is left as it was


def test_the_ratio_range_shows_how_little_a_ratio_over_a_few_right_answers_means():
    """open_clip right on 5 of 1,319 images (one would be chance) and the project on 112: the point ratio
    is 22.4, and the Wilson intervals (0.0016-0.0088 and 0.071-0.101) allow anything from 8 to 62."""
    low, high = ratio_range({"top1": 5 / 1319, "n": 1319}, {"top1": 112 / 1319, "n": 1319})
    assert (round(low), round(high)) == (8, 62)
    low, high = ratio_range({"top1": 300 / 1000, "n": 1000}, {"top1": 600 / 1000, "n": 1000})
    assert 1.7 < low < 2 < high < 2.4  # hundreds of right answers: a narrow range around the ratio
    assert ratio_range({"top1": 0.0, "n": 50}, {"top1": 0.5, "n": 50})[1] is None
