"""The torch-free runtime: same pixels as training, ensembling maths, search cache, the clip-onnx CLI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipmodel.data import MEAN, STD, to_tensor
from clipmodel.export import export_onnx
from clipmodel.images import ImageError, load_rgb, preprocess
from clipmodel.runtime import ClipRuntime
from test_export import build_model_folder

ROOT = Path(__file__).resolve().parents[1]
BACKGROUND = (10, 200, 30)  # not white, so compositing with the wrong colour shows


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runtime")
    return export_onnx(build_model_folder(root / "models", "vit", background=BACKGROUND), root / "onnx")


@pytest.fixture(scope="module")
def rt(onnx_dir) -> ClipRuntime:
    return ClipRuntime.load(onnx_dir, threads=1)


def shapes(seed: int, size: tuple[int, int] = (37, 91)) -> Image.Image:
    """An RGBA picture with opaque, translucent and fully transparent regions."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    rgba[:, : size[0] // 3, 3] = 0
    rgba[:, size[0] // 3: 2 * size[0] // 3, 3] = 128
    rgba[:, 2 * size[0] // 3:, 3] = 255
    return Image.fromarray(rgba, "RGBA")


def odd_images(folder: Path) -> list[Path]:
    """One file per awkward case: alpha (RGBA, LA, palette with transparency), grey, 16-bit, odd sizes."""
    base = shapes(0)
    cases = {
        "rgba.png": base,
        "la.png": base.convert("LA"),
        "grey.png": base.convert("L"),
        "rgb_wide.jpg": shapes(1, (91, 37)).convert("RGB"),
    }
    palette = base.convert("RGB").quantize(16)
    palette.info["transparency"] = 3
    cases["palette.png"] = palette
    wide = (np.random.default_rng(2).integers(0, 65536, (91, 37))).astype(np.uint16)
    cases["sixteen.png"] = Image.fromarray(wide)  # mode I;16
    folder.mkdir(exist_ok=True)
    for name, img in cases.items():
        img.save(folder / name)
    assert Image.open(folder / "sixteen.png").mode.startswith("I")
    return [folder / name for name in cases]


def test_import_does_not_load_torch():
    code = "import clipmodel.runtime, clipmodel.runtime_cli, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# Where onnxruntime finds one of these it sends and writes nothing, whatever ORT_DISABLE_TELEMETRY says.
CI_MARKERS = ("ORT_RUNNING_UNIT_TESTS", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
              "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER")


def files_written(cmd: list[str], home: Path, cwd: Path = ROOT) -> list[str]:
    """The files a command leaves in an empty home and temp folder, run as onnxruntime's telemetry sees
    a user's machine: ORT_DISABLE_TELEMETRY unset and no CI marker in the environment."""
    env = {k: v for k, v in os.environ.items() if k not in (*CI_MARKERS, "ORT_DISABLE_TELEMETRY")}
    (home / "tmp").mkdir(parents=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={
        **env, "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"), "TMPDIR": str(home / "tmp")})
    assert proc.returncode == 0, proc.stderr
    return sorted(p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file())


def test_onnxruntime_telemetry_is_off(onnx_dir, tmp_path):
    """onnxruntime >= 1.29 on Linux and macOS uploads usage events to Microsoft, and keeps a device id
    and an event cache under $XDG_CACHE_HOME/Microsoft, unless ORT_DISABLE_TELEMETRY is set before its
    import; importing clipmodel sets it. A bare session shows what would be written otherwise."""
    bare = files_written([sys.executable, "-c", "import sys, onnxruntime; onnxruntime.InferenceSession(sys.argv[1])",
                          str(onnx_dir / "text_encoder.onnx")], tmp_path / "bare")
    if not bare:
        pytest.skip("this onnxruntime writes no telemetry files: nothing to turn off")
    assert any(p.endswith(".onnxruntime/deviceid") for p in bare), bare
    code = "import sys; from clipmodel.runtime import ClipRuntime; ClipRuntime.load(sys.argv[1]).encode_texts(['a cat'])"
    assert files_written([sys.executable, "-c", code, str(onnx_dir)], tmp_path / "clipmodel") == []


def test_pixels_match_training_preprocessing(rt, tmp_path):
    size = rt.pre.image_size
    mean, std = np.array(MEAN).reshape(3, 1, 1), np.array(STD).reshape(3, 1, 1)
    for path in odd_images(tmp_path):
        train = to_tensor(preprocess(load_rgb(path, BACKGROUND), size)[None].copy()).numpy()[0]
        for source in (path, path.read_bytes(), Image.open(path)):
            ours = rt.pre.normalise(rt.pre.rgb(source)[None])[0]
            assert ours.shape == (3, size, size) and ours.dtype == np.float32
            diff = np.abs((ours * std + mean) - (train * std + mean)) * 255  # back in 0-255 pixel units
            assert diff.max() <= 1, (path.name, type(source), diff.max())


def test_encode_images_batches_and_names_bad_files(rt, tmp_path):
    paths = odd_images(tmp_path)
    together = rt.encode_images(paths, batch_size=len(paths))
    assert together.shape == (len(paths), 16) and np.allclose(np.linalg.norm(together, axis=-1), 1, atol=1e-5)
    assert np.allclose(rt.encode_images(paths, batch_size=4), together, atol=1e-5)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageError, match="broken.png"):
        rt.encode_images([paths[0], tmp_path / "broken.png"])


def test_classify_ensembles_templates(rt, monkeypatch):
    vectors = {"a red circle": [1.0, 0.0], "one red circle": [0.8, 0.6], "a blue square": [0.0, 1.0],
               "one blue square": [-0.6, 0.8]}
    monkeypatch.setattr(rt, "encode_texts", lambda texts: np.array([vectors[t] for t in texts], np.float32))
    monkeypatch.setattr(rt, "encode_images", lambda images: np.array(images, np.float32))
    result = rt.classify([[1.0, 0.0], [0.0, 1.0]], ["red circle", "blue square"], ("a {}", "one {}"), k=1)
    assert [[label for label, _ in row] for row in result] == [["red circle"], ["blue square"]]
    red = np.array([1.8, 0.6]) / np.linalg.norm([1.8, 0.6])
    blue = np.array([-0.6, 1.8]) / np.linalg.norm([-0.6, 1.8])
    logits = rt.pre.logit_scale * np.array([red[0], blue[0]])
    assert result[0][0][1] == pytest.approx(1 / (1 + np.exp(logits[1] - logits[0])), rel=1e-5)


def test_classify_real_model(rt, tmp_path):
    paths = odd_images(tmp_path)[:2]
    result = rt.classify(paths, ["red circle", "blue square", "green star"], k=2)
    assert len(result) == 2 and all(len(row) == 2 for row in result)
    for row in result:
        assert row[0][1] >= row[1][1] and 0 < row[0][1] + row[1][1] <= 1 + 1e-6


def test_search_cache_reuses_unchanged_files(rt, tmp_path, monkeypatch):
    images, cache = tmp_path / "images", tmp_path / "cache"
    paths = odd_images(images)
    (images / "sub").mkdir()
    shapes(5).save(images / "sub" / "nested.png")
    (images / "notes.txt").write_text("not an image, not even tried")
    embedded = []
    real = rt.embed_pixels
    monkeypatch.setattr(rt, "embed_pixels", lambda pixels: embedded.append(len(pixels)) or real(pixels))

    first = rt.search("a red circle", images, top=3, cache_dir=cache)
    assert sum(embedded) == len(paths) + 1 and len(first) == 3
    (cache_file,) = cache.iterdir()

    embedded.clear()
    assert rt.search("a red circle", images, top=3, cache_dir=cache) == first
    assert embedded == []

    changed = images / "rgba.png"
    stat = changed.stat()
    shapes(9).save(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    (images / "grey.png").unlink()
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.warns(UserWarning, match=r"broken\.jpg"):
        paths_now, embeddings = rt.index(images, cache_dir=cache)
    assert sum(embedded) == 1  # only the changed file; the broken one was skipped, the deleted one dropped
    assert sorted(p.name for p in paths_now) == sorted(["rgba.png", "la.png", "rgb_wide.jpg", "palette.png",
                                                       "sixteen.png", "nested.png"])
    assert np.allclose(embeddings[[p.name for p in paths_now].index("rgba.png")],
                       rt.encode_images([changed])[0], atol=1e-6)
    with np.load(cache_file) as z:
        assert sorted(z["path"].tolist()) == sorted(p.relative_to(images).as_posix() for p in paths_now)
    assert [p.name for p in cache.iterdir()] == [cache_file.name]  # replaced in place, no temporary left

    cache_file.write_bytes(cache_file.read_bytes()[:100])  # truncated by a crash or a full disk
    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        assert rt.search("a red circle", images, top=3, cache_dir=cache)[0][0].exists()
    with np.load(cache_file) as z:  # rebuilt whole
        assert len(z["path"]) == len(paths_now)


def clip_onnx(*args: str, env_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(env_home), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "clipmodel.runtime_cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env)


def test_cli_classify_and_search(onnx_dir, tmp_path):
    paths = odd_images(tmp_path / "images")
    templates = tmp_path / "templates.txt"
    templates.write_text("# prompts\na photo of a {}.\n\na drawing of a {}.\n")
    proc = clip_onnx("classify", "--model", str(onnx_dir), str(paths[0]), str(paths[1]),
                     "--labels", "red circle, blue square,green star", "--templates", str(templates), "--top", "2",
                     env_home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(paths[0]) and lines[3] == str(paths[1]) and len(lines) == 6
    probs = [float(line.split()[0]) for line in lines[1:3]]
    assert probs[0] >= probs[1] and lines[1].split(maxsplit=1)[1] in ("red circle", "blue square", "green star")

    missing = tmp_path / "x.png"  # an unreadable image is named and skipped; the rest are still classified
    proc = clip_onnx("classify", "--model", str(onnx_dir), str(missing), str(paths[0]), "--labels", "a,b",
                     env_home=tmp_path)
    assert proc.returncode == 1 and proc.stdout.splitlines()[0] == str(paths[0]) and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"clip-onnx classify: skipped missing_file: {missing}",
                                        "clip-onnx classify: 1 of 2 images could not be read (skipped above)"]

    proc = clip_onnx("search", "--model", str(onnx_dir), "--images", str(tmp_path / "images"), "a red circle",
                     "--top", "2", env_home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(maxsplit=1) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 and float(rows[0][0]) >= float(rows[1][0]) and Path(rows[0][1]).is_file()
    assert len(list((tmp_path / "clip-onnx").glob("*.npz"))) == 1


BLOCK_TORCH = """
import importlib.abc, runpy, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the runtime must not need torch)")
sys.meta_path.insert(0, NoTorch())
sys.argv[0] = "clip-onnx"
runpy.run_module("clipmodel.runtime_cli", run_name="__main__")
"""


def test_cli_search_runs_where_torch_cannot_be_imported(onnx_dir, tmp_path):
    """As in an app's venv without torch: every torch import raises, and search still works."""
    paths = odd_images(tmp_path / "images")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "search", "--model", str(onnx_dir), "--images",
                           str(tmp_path / "images"), "a red circle", "--top", "3"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(maxsplit=1) for line in proc.stdout.splitlines()]
    assert len(rows) == 3 and {Path(r[1]).name for r in rows} <= {p.name for p in paths}


def test_cli_errors_are_one_line(onnx_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        (("classify", "--model", str(tmp_path / "nope"), "x.png", "--labels", "a"), "model folder"),
        (("search", "--model", str(onnx_dir), "--images", str(tmp_path / "empty"), "q"), "no readable images"),
        (("search", "--model", str(onnx_dir), "--images", str(tmp_path / "missing"), "q"), "not found"),
    ]
    for args, message in cases:
        proc = clip_onnx(*args, env_home=tmp_path)
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("clip-onnx: "), proc.stderr
    # Usage errors are argparse's: its usage line, then one line naming the problem, exit 2.
    for args, message in [(("classify", "--model", str(onnx_dir), "x.png", "--labels", " , "), "no class names"),
                          (("classify", "--model", str(onnx_dir), "x.png", "--labels", "a", "--top", "0"), "--top"),
                          (("zeroshot", "--model", str(onnx_dir), "set.csv", "--templates", str(tmp_path / "no")),
                           "--templates")]:
        proc = clip_onnx(*args, env_home=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1], (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_cli_searches_a_folder_whose_names_are_not_utf8(onnx_dir, tmp_path):
    folder = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(folder)
    shapes(1).save(folder + b"/\xff.png")
    shapes(2).save(folder + b"/ok.png")
    for _ in range(2):  # the second run reads the cache it wrote
        proc = clip_onnx("search", "--model", str(onnx_dir), "--images", os.fsdecode(folder), "a red circle",
                         env_home=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "caf\\xe9/\\xff.png" in proc.stdout and "ok.png" in proc.stdout


def test_cli_output_into_a_closed_pipe_ends_quietly(onnx_dir, tmp_path):
    """`clip-onnx classify ... | head -1`: the reader gone, the command ends with status 1 and no traceback;
    a usage error names the subcommand's usage."""
    paths = odd_images(tmp_path / "images")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "clipmodel.runtime_cli", "classify", "--model", str(onnx_dir),
                             *map(str, paths), "--labels", "a,b"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env=env)
    proc.stdout.close()  # before it writes a line
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 1 and stderr == "", stderr
    proc = clip_onnx("classify", "--model", str(onnx_dir), str(paths[0]), "--labels", "a", "--support-weight", "-1",
                     env_home=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: clip-onnx classify"), proc.stderr


def test_one_path_or_label_where_a_list_is_needed_is_refused_by_both_encoders(rt, onnx_dir, tmp_path):
    """A bare string is iterable: images("photo.png") read "/" as a path ("Is a directory: '/'") and
    classify(..., "cat") classified into the labels c, a, t. Both encoders refuse it, naming the item;
    an empty list is [0, D]."""
    from clipmodel.encoder import Encoder

    path = odd_images(tmp_path)[0]
    enc = Encoder.load(onnx_dir.parent / "models")
    for call in (lambda: rt.encode_images(str(path)), lambda: rt.classify([path], "cat"),
                 lambda: rt.encode_texts("a cat"), lambda: enc.images(path), lambda: enc.texts("a cat"),
                 lambda: enc.class_embeddings("cat"), lambda: rt.class_embeddings(["cat"], "a {}")):
        with pytest.raises(TypeError, match=r"a list is needed, got one item \(.*; pass \[item\]"):
            call()
    assert rt.encode_images([]).shape == enc.images([]).shape == (0, 16)
    assert np.allclose(enc.images([path]), rt.encode_images([path]), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        rt.search("a cat", path)


def test_texts_batched_by_length_come_back_in_the_order_given(rt, onnx_dir):
    """Both encoders embed texts in batches of similar length (tokenizer.length_order) and return them
    in the caller's order: each row is that text embedded alone."""
    from clipmodel.encoder import Encoder

    enc = Encoder.load(onnx_dir.parent / "models", batch_size=2)
    texts = ["a large red circle on the left of a small blue square", "red", "a cat", "two stars", "blue", "a"]
    alone = np.concatenate([rt.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(rt.encode_texts(texts, batch_size=2), alone, atol=1e-6)
    np.testing.assert_allclose(enc.texts(texts), alone, atol=1e-5)


@pytest.mark.slow
def test_the_core_install_runs_exported_models_without_torch(onnx_dir, tmp_path):
    """`pip install` without the `train` extra, as an app would: no torch in the venv, and clip-onnx
    embeds as ClipRuntime does in this one; the torch CLI says in one line what it needs."""
    source = tmp_path / "src"  # the package's files only: pip builds in the tree it is given
    for name in ("clipmodel", "pipeline"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([venv / "bin/python", "-m", "pip", "install", "-q", str(source)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert subprocess.run([venv / "bin/python", "-c", "import torch"], capture_output=True).returncode != 0
    image = odd_images(tmp_path / "images")[0]
    out = tmp_path / "emb.npy"
    code = ("import sys, numpy as np; from clipmodel.runtime import ClipRuntime; "
            f"np.save({str(out)!r}, ClipRuntime.load({str(onnx_dir)!r}).encode_images([{str(image)!r}]))")
    proc = subprocess.run([venv / "bin/python", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(out), ClipRuntime.load(onnx_dir).encode_images([image]))
    proc = subprocess.run([venv / "bin/clip-onnx", "classify", "--model", str(onnx_dir), str(image), "--labels", "red,blue"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 3, proc.stderr  # the path, then a line per label
    proc = subprocess.run([venv / "bin/clipmodel", "--help"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "clipmodel needs torch, which the train extra installs (pip install 'clip-pipeline[train]'); "
        "clip-onnx runs exported models without it"]
