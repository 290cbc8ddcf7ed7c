"""The ingest stage: every source, every kind of bad item, and the output contract."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clipmodel.images import load_rgb, preprocess
from conftest import run_stage, write_params
from conftest_ingest_helpers import add_member as _add, BAD_ROWS, BOMB_MAX_PIXELS, acceptance_csv, encode, good_images, noise
from pipeline.ingest import decode_in_order, run
from pipeline.params import DataParams
from pipeline.sources import Record, Rejection, SourceError, read_coco, read_folder, read_webdataset, split_of

SIZE = 16


def params(**overrides) -> DataParams:
    return DataParams(image_size=SIZE, shard_images=8, workers=1, **overrides)


def reasons(root: Path) -> list[str]:
    return sorted(pd.read_csv(root / "data/rejected.csv").reason)


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    pd.DataFrame(rows, columns=["filepath", "title"]).to_csv(path, sep="\t", index=False)
    return path


def test_acceptance_csv_of_20_good_and_12_bad_rows(tmp_path):
    csv, _ = acceptance_csv(tmp_path / "src")
    write_params(tmp_path, {"data": {"source": "csv", "image_size": SIZE, "max_pixels": BOMB_MAX_PIXELS,
                                     "shard_images": 8, "workers": 2, "csv": {"path": str(csv)}}})
    proc = run_stage(tmp_path, "ingest")
    report = json.loads((tmp_path / "reports/ingest.json").read_text())
    assert (report["accepted"], report["rejected"], report["duplicates"]) == (20, 12, 0), proc.stdout
    rejected = pd.read_csv(tmp_path / "data/rejected.csv", keep_default_na=False)
    assert list(rejected.columns) == ["source", "reason", "detail"]
    assert sorted(rejected.reason) == sorted(reason for *_, reason in BAD_ROWS)
    assert report["reasons"] == rejected.reason.value_counts().to_dict()
    # each row carries its own reason: rows alternate good/bad after the header, so bad row k is line 2k + 3
    by_line = {s.rsplit(":line ", 1)[1]: r for s, r in zip(rejected.source, rejected.reason)}
    assert by_line == {str(2 * k + 3): reason for k, (*_, reason) in enumerate(BAD_ROWS)}
    assert rejected.detail[rejected.reason == "empty_caption"].tolist() == ["3 bytes of whitespace"]

    manifest = pd.read_parquet(tmp_path / "data/manifest.parquet")
    assert list(manifest.columns) == ["id", "source", "captions", "split", "shard", "row", "labels", "duplicates"]
    assert manifest.captions.map(list).tolist() == [[f"good image {i}"] for i in range(20)]
    assert sorted(p.name for p in (tmp_path / "data/images").iterdir()) == \
        ["shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    assert sum(report["splits"].values()) == 20 and report["source"] == "csv"


def test_pixels_sit_at_their_manifest_shard_and_row(tmp_path):
    names = good_images(tmp_path / "img", 11)
    csv = write_csv(tmp_path / "c.tsv", [(f"img/{n}", f"caption {n}") for n in names])
    run(params(source="csv", csv={"path": str(csv)}), tmp_path)
    manifest = pd.read_parquet(tmp_path / "data/manifest.parquet")
    shards = [np.load(tmp_path / f"data/images/shard-0000{k}.npy", mmap_mode="r") for k in (0, 1)]
    assert [s.shape for s in shards] == [(8, SIZE, SIZE, 3), (3, SIZE, SIZE, 3)] and shards[0].dtype == np.uint8
    assert manifest.shard.dtype == np.int32 and manifest.row.dtype == np.int32
    for name, shard, row in zip(manifest.id, manifest.shard, manifest.row):
        assert (shards[shard][row] == preprocess(load_rgb(tmp_path / name), SIZE)).all()
    assert (manifest.labels == "{}").all()
    assert manifest.source.tolist() == [str(tmp_path / name) for name in manifest.id]  # evaluate matches on it


def test_duplicates_merge_captions_and_repeated_paths_decode_once(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "a.png").write_bytes(encode(noise(1)))
    (img / "copy-of-a.png").write_bytes(encode(noise(1)))
    (img / "b.png").write_bytes(encode(noise(2)))
    csv = write_csv(tmp_path / "c.tsv", [("img/a.png", "first"), ("img/b.png", "bee"), ("img/copy-of-a.png", "second"),
                                         ("img/a.png", "third"), ("img/copy-of-a.png", "first")])
    report = run(params(source="csv", csv={"path": str(csv)}), tmp_path)
    manifest = pd.read_parquet(tmp_path / "data/manifest.parquet")
    assert manifest.id.tolist() == ["img/a.png", "img/b.png"]
    assert manifest.captions.map(list).tolist() == [["first", "second", "third"], ["bee"]]
    assert manifest.duplicates.map(list).tolist() == [["img/copy-of-a.png"], []]  # merged, and named
    assert (report["accepted"], report["duplicates"], report["rejected"]) == (2, 1, 1)
    assert reasons(tmp_path) == ["duplicate_row"]  # copy-of-a.png + "first" adds nothing


def test_later_rows_of_a_rejected_image_are_rejected_too(tmp_path):
    csv = write_csv(tmp_path / "c.tsv", [("gone.png", "one"), ("gone.png", "two")])
    (tmp_path / "ok.png").write_bytes(encode(noise(0)))
    with open(csv, "a") as f:
        f.write("ok.png\tfine\n")
    run(params(source="csv", csv={"path": str(csv)}), tmp_path)
    assert reasons(tmp_path) == ["missing_file", "missing_file"]


def test_split_is_a_stable_function_of_the_key(tmp_path):
    keys = [f"img/{i}.jpg" for i in range(20000)]
    splits = [split_of(k, 0.1, 0.2) for k in keys]
    assert splits == [split_of(k, 0.1, 0.2) for k in keys]
    assert abs(splits.count("val") / len(keys) - 0.1) < 0.01 and abs(splits.count("test") / len(keys) - 0.2) < 0.01

    names = good_images(tmp_path / "img", 30)
    rows = [(f"img/{n}", f"caption {n}") for n in names]
    small = run(params(source="csv", val_fraction=0.3, test_fraction=0.3,
                       csv={"path": str(write_csv(tmp_path / "a.tsv", rows[:15]))}), tmp_path / "a")
    before = pd.read_parquet(tmp_path / "a/data/manifest.parquet").set_index("id").split
    run(params(source="csv", val_fraction=0.3, test_fraction=0.3,
               csv={"path": str(write_csv(tmp_path / "b.tsv", rows[15:] + rows[:15]))}), tmp_path / "b")
    after = pd.read_parquet(tmp_path / "b/data/manifest.parquet").set_index("id").split
    assert small["accepted"] == 15 and after[before.index].tolist() == before.tolist()


def test_output_does_not_depend_on_the_number_of_workers(tmp_path):
    data = {"source": "synthetic", "synthetic": {"num_images": 60}}
    run(params(**data), tmp_path / "one")
    run(params(**data).model_copy(update={"workers": 2}), tmp_path / "two")
    for name in ("data/manifest.parquet", "data/images/shard-00007.npy", "data/rejected.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_the_manifest_changes_with_the_pixels_not_only_the_captions(tmp_path):
    """Training resumes a checkpoint only for the same manifest: a change of background (or of the image
    files) must change the manifest, which holds the stored pixels' digest in its metadata."""
    import hashlib
    import pyarrow.parquet as pq
    from PIL import Image
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
        rgba[: 4 + i, :, :] = (200, 10 * i, 0, 255)  # opaque stripe on a transparent square
        Image.fromarray(rgba, "RGBA").save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"stripe {i}")
    digests = {}
    for name, colour in (("white", (255, 255, 255)), ("black", (0, 0, 0))):
        run(params(source="folder", folder={"path": str(src)}, background=colour), tmp_path / name)
        table = pq.read_table(tmp_path / name / "data/manifest.parquet")
        shards = sorted((tmp_path / name / "data/images").glob("shard-*.npy"))
        stored = np.concatenate([np.load(f) for f in shards])
        digests[name] = table.schema.metadata[b"pixels_sha256"].decode()
        assert digests[name] == hashlib.sha256(stored.tobytes()).hexdigest()
    assert digests["white"] != digests["black"]
    manifests = [pd.read_parquet(tmp_path / n / "data/manifest.parquet") for n in digests]
    pd.testing.assert_frame_equal(*manifests)  # same rows: only the digest tells the two apart


def test_ingest_replaces_only_its_own_outputs(tmp_path):
    (tmp_path / "data/images").mkdir(parents=True)
    (tmp_path / "data/images/shard-00042.npy").write_bytes(b"stale")
    (tmp_path / "data/tokens.npy").write_bytes(b"the tokenize stage's")
    run(params(synthetic={"num_images": 20}), tmp_path)
    assert sorted(p.name for p in (tmp_path / "data/images").iterdir()) == ["shard-00000.npy", "shard-00001.npy",
                                                                             "shard-00002.npy"]
    assert (tmp_path / "data/tokens.npy").read_bytes() == b"the tokenize stage's"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == \
        ["images", "manifest.parquet", "rejected.csv", "tokens.npy"]  # no temporaries left behind


def test_a_failed_run_keeps_the_previous_outputs(tmp_path):
    run(params(synthetic={"num_images": 20}), tmp_path)
    before = (tmp_path / "data/manifest.parquet").read_bytes()
    csv = write_csv(tmp_path / "c.tsv", [("nothing.png", "x")])
    with pytest.raises(SourceError, match=r"no usable image .*1 rejected.*; first: .*c.tsv:line 2: missing_file: .*nothing.png"):
        run(params(source="csv", csv={"path": str(csv)}), tmp_path)
    assert (tmp_path / "data/manifest.parquet").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["images", "manifest.parquet", "rejected.csv"]
    # rejected.csv lists this run's rejections, not the last good run's: the user's list of what to fix
    assert pd.read_csv(tmp_path / "data/rejected.csv").reason.tolist() == ["missing_file"]


@pytest.mark.parametrize("setup, message", [
    (lambda d: {"path": str(d / "nope.csv")}, "nope.csv: not found"),
    (lambda d: {"path": str(write_csv(d / "c.tsv", [("a.png", "x")])), "caption_column": "caption"},
     "c.tsv: no column 'caption'; it has ['filepath', 'title']"),
])
def test_an_unreadable_source_exits_with_one_line(tmp_path, setup, message):
    write_params(tmp_path, {"data": {"source": "csv", "csv": setup(tmp_path)}})
    proc = run_stage(tmp_path, "ingest", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("ingest: ") and "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "data/manifest.parquet").exists()


def test_decode_in_order_bounds_what_is_in_flight():
    submitted = []

    def recording_map(fn, batch):
        submitted.append(len(batch))
        return map(fn, batch)

    repeats = [Record("k0", "s", "s", b"", ("again",))]  # in the same batch as the first k0
    items = [Record(f"k{i % 700}", "s", "s", b"", ("c",)) for i in range(1500)]
    items = items[:1] + repeats + items[1:] + [Rejection("s", "r")]
    out = list(decode_in_order(items, lambda rec: rec.key, recording_map))
    assert [it for it, _ in out] == items
    assert [r for _, r in out if r is not None] == [f"k{i}" for i in range(700)]
    assert out[1][1] is None and all(r is None for _, r in out[701:])
    assert max(submitted) <= 512 and sum(submitted) == 700


def test_coco(tmp_path):
    images = tmp_path / "train2017"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(encode(noise(i), "JPEG"))
    ann = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(4)]
        + [{"id": 9, "file_name": "../outside.jpg"}, {"id": 10, "file_name": "2.jpg"}, {"id": 1, "file_name": "2.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 0, "caption": "  a cat "}, {"id": 2, "image_id": 1, "caption": "a dog"},
            {"id": 3, "image_id": 0, "caption": "a cat on a mat"}, {"id": 4, "image_id": 1, "caption": " "},
            {"id": 5, "image_id": 0, "caption": "a cat"}, {"id": 6, "image_id": 77, "caption": "lost"},
            {"id": 7, "image_id": 3, "caption": "missing file"}, {"id": 8, "image_id": 9, "caption": "escape"},
            {"id": 9, "image_id": "2", "caption": "an id as a string"},
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(ann))
    data = params(source="coco", coco={"annotations": str(path), "images": str(images)})
    recs = list(read_coco(data.coco))
    assert {r.key: r.captions for r in recs if isinstance(r, Record)} == \
        {"0.jpg": ("a cat", "a cat on a mat"), "1.jpg": ("a dog",), "3.jpg": ("missing file",)}
    report = run(data, tmp_path)
    assert report["accepted"] == 2
    assert report["reasons"] == {"empty_caption": 1, "duplicate_row": 1, "missing_image": 2, "missing_caption": 2,
                                 "missing_file": 1, "unsafe_path": 1, "duplicate_image_id": 1}
    details = {r.source.rsplit(":", 1)[1]: r.detail for r in recs if isinstance(r, Rejection)}
    assert details["annotations[5]"] == "image_id 77"
    assert details["annotations[8]"] == "image_id '2' (an image has id 2, a number; this one is a string: ids must match in type)"
    assert "outside the data root" in details["image 9"] and "hard-link" in details["image 9"]
    manifest = pd.read_parquet(tmp_path / "data/manifest.parquet")
    assert manifest.captions.map(list).tolist() == [["a cat", "a cat on a mat"], ["a dog"]]


def test_webdataset(tmp_path):
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        _add(tar, "s/a.jpg", encode(noise(1), "JPEG"))
        _add(tar, "s/a.txt", b"  an apple\n")
        _add(tar, "s/a.json", b"{}")
        _add(tar, "../evil.png", encode(noise(9)))
        _add(tar, "s/b.png", encode(noise(2)))  # no caption
        _add(tar, "s/c.txt", b"no image")
        _add(tar, "s/d.txt", b"\xff\xfe")
        _add(tar, "s/d.webp", encode(noise(4), "WEBP", lossless=True))
        link = tarfile.TarInfo("s/e.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with tarfile.open(tmp_path / "shard-001.tar.gz", "w:gz") as tar:
        _add(tar, "s/a.png", encode(noise(3)))  # same key, other shard: another sample
        _add(tar, "s/a.txt", b"another apple")
    (tmp_path / "shard-002.tar").write_bytes(b"not a tar at all" * 64)
    data = params(source="webdataset", webdataset={"shards": str(tmp_path / "shard-*.tar*")})
    recs = list(read_webdataset(data.webdataset))
    assert {r.key: r.captions for r in recs if isinstance(r, Record)} == \
        {"shard-000.tar/s/a": ("an apple",), "shard-001.tar.gz/s/a": ("another apple",)}
    report = run(data, tmp_path)
    assert report["accepted"] == 2
    assert report["reasons"] == {"unsafe_path": 2, "missing_caption": 1, "missing_image": 1, "caption_not_utf8": 1,
                                 "corrupt_shard": 1}
    assert not (tmp_path / "evil.png").exists() and not (tmp_path.parent / "evil.png").exists()


def test_webdataset_shards_as_a_brace_range_a_glob_or_both(tmp_path):
    """The spec as WebDataset and open_clip users write it; a folder or no match is one clear line."""
    (tmp_path / "d").mkdir()
    for n in range(4):
        with tarfile.open(tmp_path / f"train-{n:06d}.tar", "w") as tar:
            _add(tar, f"k{n}.png", encode(noise(n)))
            _add(tar, f"k{n}.txt", f"image {n}".encode())

    def keys(spec: str) -> list[str]:
        return [r.key for r in read_webdataset(params(source="webdataset", webdataset={"shards": spec}).webdataset)]
    assert keys(str(tmp_path / "train-{000001..000002}.tar")) == ["train-000001.tar/k1", "train-000002.tar/k2"]
    assert keys(str(tmp_path / "train-{000000,000003}.t*")) == ["train-000000.tar/k0", "train-000003.tar/k3"]
    with pytest.raises(SourceError, match=r"data.webdataset.shards: .*/d is a folder: name the shards in it, e.g. '.*/d/\*.tar'"):
        keys(str(tmp_path / "d"))
    with pytest.raises(SourceError, match=r"data.webdataset.shards: no shards match '.*train-\{000007..000009\}.tar'"):
        keys(str(tmp_path / "train-{000007..000009}.tar"))
    # one past the last shard (a typo in a range) is an error, not three quarters of the data in silence
    with pytest.raises(SourceError, match=r"data.webdataset.shards: 1 of the 5 names in .* match no file, first '.*train-000004.tar'"):
        keys(str(tmp_path / "train-{000000..000004}.tar"))


@pytest.mark.parametrize("cut", ["in_header", "in_member"])
def test_a_truncated_shard_is_one_rejection_naming_where_it_was_cut(tmp_path, cut):
    """tarfile reads a shard cut inside a member header as its end: the samples after the cut would
    vanish with no word. Either cut is one `corrupt_shard` naming the sample it fell in, which is not
    also counted as `missing_caption` or `missing_image`; the samples before it are kept."""
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tar:
        for n in range(4):
            _add(tar, f"k{n}.png", encode(noise(n)))
            _add(tar, f"k{n}.txt", f"image {n}".encode())
    data = whole.read_bytes()
    with tarfile.open(whole) as tar:
        members = {m.name: m for m in tar.getmembers()}
    txt = members["k2.txt"]  # the cut falls in k2: its image read, its caption not
    end = txt.offset + 100 if cut == "in_header" else txt.offset_data + 3
    (tmp_path / "cut.tar").write_bytes(data[:end])
    recs = list(read_webdataset(params(source="webdataset", webdataset={"shards": str(tmp_path / "cut.tar")}).webdataset))
    assert [r.key for r in recs if isinstance(r, Record)] == ["cut.tar/k0", "cut.tar/k1"]
    bad = [r for r in recs if isinstance(r, Rejection)]
    assert [(b.reason, b.source) for b in bad] == [("corrupt_shard", f"{tmp_path / 'cut.tar'}:k2")]
    assert "this sample (read of it: png" in bad[0].detail and "the rest of the shard unread" in bad[0].detail
    assert list(read_webdataset(params(source="webdataset", webdataset={"shards": str(whole)}).webdataset))[-1].key == "whole.tar/k3"


def test_folder(tmp_path):
    root, outside = tmp_path / "photos", tmp_path / "secret"
    (root / "nested").mkdir(parents=True)
    outside.mkdir()
    (root / "a.png").write_bytes(encode(noise(1)))
    (root / "a.txt").write_text("an apple\n")
    (root / "nested/b.jpg").write_bytes(encode(noise(2), "JPEG"))
    (root / "nested/b.txt").write_bytes("\ufeffa banana".encode())  # a byte-order mark, as Notepad saves
    (root / "c.png").write_bytes(encode(noise(3)))  # no sidecar
    (root / "orphan.txt").write_text("no image")
    (root / "notes.md").write_text("ignored")
    (outside / "x.png").write_bytes(encode(noise(4)))
    (outside / "x.txt").write_text("private")
    os.symlink(outside / "x.png", root / "x.png")
    (root / "x.txt").write_text("escaping image")
    os.symlink(outside, root / "linked")
    data = params(source="folder", folder={"path": str(root)})
    recs = list(read_folder(data.folder))
    assert {r.key: r.captions for r in recs if isinstance(r, Record)} == \
        {"a.png": ("an apple",), "nested/b.jpg": ("a banana",)}
    assert sorted(r.reason for r in recs if isinstance(r, Rejection)) == \
        ["missing_caption", "missing_image", "unsafe_path", "unsafe_path"]
    assert {r.source for r in recs if isinstance(r, Rejection) and r.reason.startswith("missing")} == \
        {str(root / "c.png"), str(root / "orphan.txt")}  # named as records are, by the joined path
    assert run(data, tmp_path)["accepted"] == 2


def test_synthetic_stage_writes_labels(tmp_path):
    report = run(params(synthetic={"num_images": 40, "max_objects": 2, "captions_per_image": 1}), tmp_path)
    manifest = pd.read_parquet(tmp_path / "data/manifest.parquet")
    assert report["accepted"] == len(manifest) == 40 and report["duplicates"] == 0
    labels = manifest.labels.map(json.loads)
    assert all(1 <= lab["count"] == len(lab["objects"]) <= 2 for lab in labels)
    assert manifest.source.eq("synthetic").all() and manifest.captions.map(len).eq(1).all()
    assert json.loads((tmp_path / "reports/ingest.json").read_text())["splits"] == \
        manifest.split.value_counts().reindex(["train", "val", "test"], fill_value=0).to_dict()


def test_synthetic_captions_per_image_are_distinct_descriptions_of_one_scene(tmp_path):
    run(params(synthetic={"num_images": 30, "captions_per_image": 4}), tmp_path)
    manifest = pd.read_parquet(tmp_path / "data/manifest.parquet")
    counts = manifest.captions.map(len)
    assert counts.between(1, 4).all() and counts.mean() > 3  # identical phrasings are kept once
    assert manifest.captions.map(lambda c: len(set(c)) == len(c)).all()
