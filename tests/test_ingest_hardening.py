"""Ingest on hostile input: every physical CSV line accounted for, COCO schema errors and WebDataset
key clashes as rejections, file names that are not UTF-8 refused by name, never a traceback."""
from __future__ import annotations

import json
import os
import tarfile

import pandas as pd
import pytest

from conftest_ingest_helpers import add_member as _add, encode, good_images, noise
from pipeline.ingest import run
from pipeline.params import DataParams
from pipeline.sources import SourceError

SIZE = 16


def params(**overrides) -> DataParams:
    return DataParams(image_size=SIZE, shard_images=8, workers=1, **overrides)


def rejected(root) -> pd.DataFrame:
    return pd.read_csv(root / "data/rejected.csv", keep_default_na=False)


def accounted(report: dict) -> int:
    return report["accepted"] + report["rejected"] + report["duplicates"] + report["rows_merged"]


@pytest.mark.parametrize("sep", ["\t", ","])
def test_every_csv_line_is_accepted_rejected_or_merged_with_its_true_line_number(tmp_path, sep):
    names = good_images(tmp_path / "img", 6)
    q = '"' if sep == "," else ""  # quoting a field that holds the separator, in CSV only
    lines = [f"filepath{sep}title",
             f"img/{names[0]}{sep}\"Hello\" sign on a wall" if sep == "\t" else f"img/{names[0]}{sep}plain",
             f"img/{names[1]}{sep}{q}two, with a comma{q}",
             f"img/{names[2]}{sep}\"an unclosed quote",                # line 4: its own line only
             "",                                                         # line 5: blank
             f"img/{names[3]}{sep}three{sep}fields",                     # line 6: malformed
             f"img/{names[4]}{sep}four",
             f"img/{names[4]}{sep}four",                                 # line 8: the same row again
             f"img/{names[4]}{sep}another caption of four",              # line 9: merged into line 7's image
             f"img/{names[5]}{sep}five"]
    path = tmp_path / ("c.tsv" if sep == "\t" else "c.csv")
    path.write_text("\n".join(lines) + "\n")
    report = run(params(source="csv", csv={"path": str(path), "sep": sep}), tmp_path)
    assert accounted(report) == len(lines) - 1  # an independent count: physical lines after the header
    bad = rejected(tmp_path)
    by_line = dict(zip(bad.source.str.rsplit(":line ", n=1).str[1].astype(int), bad.reason))
    expected = {5: "blank_line", 6: "malformed_row", 8: "duplicate_row"}
    if sep == ",":
        expected[4] = "malformed_row"  # CSV quoting: the quote never closes
    assert by_line == expected
    captions = [c for caps in pd.read_parquet(tmp_path / "data/manifest.parquet").captions for c in caps]
    if sep == "\t":  # tabs: quotes are text, the quoted title stays
        assert '"Hello" sign on a wall' in captions and '"an unclosed quote' in captions
    assert "another caption of four" in captions and report["rows_merged"] == 1


def test_an_unclosed_quote_in_a_large_csv_costs_one_line(tmp_path):
    names = good_images(tmp_path / "img", 3)
    lines = ["filepath,title"] + [f"img/{names[i % 3]},caption {i}" for i in range(3000)]
    lines[1500] = f'img/{names[0]},"never closed'
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    report = run(params(source="csv", csv={"path": str(tmp_path / "c.csv"), "sep": ","}), tmp_path)
    assert accounted(report) == 3000 and report["reasons"] == {"malformed_row": 1}
    assert rejected(tmp_path).source.tolist() == [f"{tmp_path / 'c.csv'}:line 1501"]


def test_a_csv_path_that_is_not_utf8_is_rejected_by_name(tmp_path):
    names = good_images(tmp_path / "img", 2)
    os.rename(tmp_path / "img" / names[1], os.fsencode(tmp_path / "img") + b"/caf\xe9.png")
    (tmp_path / "c.csv").write_bytes(b"filepath,title\nimg/" + names[0].encode() + b",ok\nimg/caf\xe9.png,latin-1\n")
    report = run(params(source="csv", csv={"path": str(tmp_path / "c.csv"), "sep": ","}), tmp_path)
    assert report["accepted"] == 1 and report["reasons"] == {"path_not_utf8": 1}
    assert "caf\\xe9" in rejected(tmp_path).detail[0]


def test_a_folder_file_name_that_is_not_utf8_is_rejected_by_name(tmp_path):
    root = os.fsencode(tmp_path / "photos")
    os.mkdir(root)
    for name, caption in ((b"ok", b"fine"), (b"caf\xe9", b"latin-1 name")):
        with open(root + b"/" + name + b".png", "wb") as f:
            f.write(encode(noise(len(name))))
        with open(root + b"/" + name + b".txt", "wb") as f:
            f.write(caption)
    report = run(params(source="folder", folder={"path": str(tmp_path / "photos")}), tmp_path)
    assert report["accepted"] == 1 and report["reasons"] == {"path_not_utf8": 1}


def test_coco_schema_errors_are_rejections(tmp_path):
    good_images(tmp_path / "img", 3)
    names = sorted(p.name for p in (tmp_path / "img").iterdir())
    coco = {
        "images": [{"id": 1, "file_name": names[0]}, {"file_name": names[1]}, {"id": 3},
                   {"id": [4], "file_name": names[2]}, {"id": 5, "file_name": 42}, "not an object",
                   {"id": 7, "file_name": names[2]}],
        "annotations": [{"image_id": 1, "caption": "good"}, "not an object", {"image_id": 1, "caption": 12},
                        {"image_id": [1], "caption": "list id"}, {"image_id": 7, "caption": "emoji \ud83d cut"},
                        {"image_id": 7, "caption": "fine too"}, {"image_id": 7}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    report = run(params(source="coco", coco={"annotations": str(tmp_path / "c.json"),
                                             "images": str(tmp_path / "img")}), tmp_path)
    assert report["accepted"] == 2
    assert report["reasons"] == {"bad_record": 8, "bad_caption": 1, "caption_not_utf8": 1}  # no caption: bad_record


@pytest.mark.parametrize("top, key, why", [({"images": None, "annotations": []}, "images", "found NoneType"),
                                           ({"images": [], "captions": []}, "annotations",
                                            r"it is missing \(keys: images, captions\)"),
                                           ([], "images", "the top level is a list")])
def test_coco_top_level_errors_name_the_key(tmp_path, top, key, why):
    (tmp_path / "c.json").write_text(json.dumps(top))
    with pytest.raises(SourceError, match=f"'{key}' must be a list \\({why}\\)"):
        run(params(source="coco", coco={"annotations": str(tmp_path / "c.json"), "images": str(tmp_path)}),
            tmp_path)


def test_webdataset_keys_follow_the_first_dot_convention_and_never_merge(tmp_path):
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        _add(tar, "a.png", encode(noise(1)))
        _add(tar, "a.txt", b"first a")
        _add(tar, "x.y.png", encode(noise(2)))   # key x, extensions y.png and y.txt: no image, no caption
        _add(tar, "x.y.txt", b"dotted")
        _add(tar, ".hidden.png", encode(noise(3)))
        _add(tar, "b.png", encode(noise(4)))
        _add(tar, "b.txt", b"b")
        _add(tar, "a.png", encode(noise(5)))     # key a again, later in the shard
        _add(tar, "a.txt", b"second a")
    report = run(params(source="webdataset", webdataset={"shards": str(tmp_path / "shard-*.tar")}), tmp_path)
    assert report["accepted"] == 2
    assert report["reasons"] == {"missing_image": 1, "bad_key": 1, "duplicate_key": 2}
    captions = pd.read_parquet(tmp_path / "data/manifest.parquet").captions.map(list).tolist()
    assert captions == [["first a"], ["b"]]
