"""The JavaScript clients (examples/node, examples/web) against the Python runtime on one exported folder.

What must agree with `clipmodel`: preprocessed pixels (bit-exact for PNG, whose decoding is exact;
JPEG decoders differ, so there the largest difference is measured and bounded), token ids, image and
text embeddings (cosine >= 0.9999 each) and the zero-shot top-1, with the folder's support set and
without it (`--support-weight 0`). The web page runs in headless
Chromium. Measurements go to reports/js_clients.json and the page's screenshot to reports/web_client.png.

Without node, the npm packages (`npm ci` in examples/node and examples/web), Chromium or selenium
these tests skip and say why; with JS_CLIENTS_REQUIRED=1 (set by .ci/run once it installed them all)
a missing piece fails instead, so CI cannot go green by skipping.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipmodel.encoder import Encoder
from clipmodel.export import export_onnx
from clipmodel.images import load_image
from clipmodel.io import files_sha256
from clipmodel.runtime import ClipRuntime
from clipmodel.support import SUPPORT_FILE, WEIGHTS_FILE, Support
from clipmodel.tokenizer import encode, load_tokenizer
from conftest_ingest_helpers import png_header
from test_export import build_model_folder
from test_runtime import files_written

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR, WEB_DIR = ROOT / "examples" / "node", ROOT / "examples" / "web"
CLI = NODE_DIR / "clip.mjs"
REPORT, SCREENSHOT = ROOT / "reports" / "js_clients.json", ROOT / "reports" / "web_client.png"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MIN_COSINE = 0.9999
MARGIN = 1e-3  # top-1 is compared where Python's two best probabilities differ by more than this

CAPTIONS = ["", "a photo of a red circle.", "two blue squares and a yellow star " * 8,  # long: truncated
            "Ünïcödé 日本語 😀 café ΣΑΣ İstanbul", "<end_of_text>", "<pad>", "<start_of_text> a <end_of_text> b",
            "\ufeff  tabs\tand\n\nnew lines  ", "$& {} '' \"quoted\" 123,456.7"]
LABELS = ["red circle", "blue square", "green triangle", "yellow star", "purple heart"]
TEMPLATES = ["{}", "a photo of a {}.", "a small {}"]

measured: dict = {}


def require(condition: bool, why: str) -> None:
    """Skip with the reason, or fail where CI has promised the JS toolchain is installed."""
    if condition:
        return
    if os.environ.get("JS_CLIENTS_REQUIRED") == "1":
        pytest.fail(f"JS_CLIENTS_REQUIRED=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    require(exe is not None, "node not found: install Node.js >= 20 to test examples/node")
    major = int(subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip().lstrip("v").split(".")[0])
    require(major >= 20, f"node {major} found, examples/node needs >= 20")
    require((NODE_DIR / "node_modules" / "onnxruntime-node").is_dir(),
            "examples/node/node_modules missing: run `npm ci` in examples/node")
    return exe


def run_cli(node: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([node, str(CLI), *args], capture_output=True, text=True, timeout=300)


def cli_json(node: str, *args: str):
    proc = run_cli(node, *args)
    assert proc.returncode == 0, f"clip.mjs {args[0]} failed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module", autouse=True)
def write_report():
    """Every measurement of this module in one JSON file, written whatever the outcome."""
    yield
    if measured:
        REPORT.parent.mkdir(exist_ok=True)
        REPORT.write_text(json.dumps(measured, indent=2, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, images) -> Path:
    """A tiny random ViT exported the way users export theirs, with a support set as the evaluate stage
    writes one: training images (here the test images) and two captions of each, embedded by the model."""
    root = tmp_path_factory.mktemp("js_model")
    folder = build_model_folder(root / "model", "vit")
    enc, paths = Encoder.load(folder), list(images.values())[:10]
    captions = [f"{template.format(LABELS[i % len(LABELS)])} {i}" for i in range(len(paths)) for template in TEMPLATES[:2]]
    Support(enc.images(paths), enc.texts(captions), np.repeat(np.arange(len(paths)), 2), weight=1.0,
            temperature=0.05, weights_sha256=files_sha256([folder / WEIGHTS_FILE])).save(folder / SUPPORT_FILE)
    return export_onnx(folder, root / "onnx")


@pytest.fixture(scope="module")
def runtime(model_dir) -> ClipRuntime:
    return ClipRuntime.load(model_dir, threads=1)


# ---------------------------------------------------------------------------------------------
# Test images

def smooth(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3] gradients plus mild noise: photo-like, so JPEG round trips stay close."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(6.3 * (a * x + b * y) + c) for a, b, c in rng.uniform(-2, 2, (3, 3))]
    image = (np.stack(channels, -1) * 100 + 128 + rng.normal(0, 6, (height, width, 3)))
    return image.clip(0, 255).astype(np.uint8)


def noise(width: int, height: int, channels: int, seed: int) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Named test images: every colour mode clipmodel handles, transparency, EXIF rotation, strips."""
    d = tmp_path_factory.mktemp("js_images")
    alpha = np.dstack([smooth(80, 120, 1), np.tile(np.linspace(0, 255, 80).astype(np.uint8), (120, 1))])
    palette = Image.fromarray(smooth(40, 30, 2)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    made = {
        "rgb_97x61.png": Image.fromarray(smooth(97, 61, 3)),
        "rgba_gradient_alpha.png": Image.fromarray(alpha, "RGBA"),
        "rgba_noise.png": Image.fromarray(noise(70, 50, 4, 4), "RGBA"),
        "la.png": Image.fromarray(noise(60, 40, 2, 5), "LA"),
        "grey.png": Image.fromarray(noise(61, 45, 1, 6), "L"),
        "grey16.png": Image.fromarray(np.random.default_rng(7).integers(0, 65536, (33, 47), dtype=np.uint16)),
        "bilevel.png": Image.fromarray(noise(41, 30, 1, 8) > 127),
        "tiny_5x3.png": Image.fromarray(noise(5, 3, 3, 9)),
        "large_1600x1200.png": Image.fromarray(smooth(1600, 1200, 10)),
        "strip_10x400.png": Image.fromarray(noise(10, 400, 3, 11)),
        "wide_900x40.png": Image.fromarray(noise(900, 40, 3, 12)),
    }
    for name, image in made.items():
        image.save(d / name)
    palette.save(d / "palette_transparent.png", transparency=3)
    base = Image.fromarray(smooth(120, 80, 13))
    for o in (3, 6, 8):
        base.save(d / f"exif{o}.png", exif=exif(o))
    base.save(d / "exif6.jpg", exif=exif(6), quality=92)
    base.save(d / "exif8_444.jpg", exif=exif(8), quality=95, subsampling=0)
    Image.fromarray(smooth(300, 200, 14)[..., 0]).save(d / "grey.jpg", quality=90)
    Image.fromarray(smooth(640, 480, 15)).save(d / "large_progressive.jpg", quality=85, progressive=True)
    return {p.name: p for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> list[Path]:
    """Random-noise PNGs of random sizes (strips and single pixels among them) in four modes: noise
    is where an inexact resampler shows first."""
    d = tmp_path_factory.mktemp("js_sweep")
    rng = np.random.default_rng(2024)
    paths = []
    for i in range(40):
        w, h = (int(v) for v in rng.integers(1, 600, 2))
        if i % 10 == 0:
            w, h = int(rng.integers(1, 12)), int(rng.integers(100, 2500))
        elif i % 10 == 1:
            w, h = int(rng.integers(100, 2500)), int(rng.integers(1, 12))
        mode, channels = [("RGB", 3), ("RGBA", 4), ("L", 1), ("LA", 2)][i % 4]
        path = d / f"{i:02d}_{w}x{h}_{mode}.png"
        Image.fromarray(noise(w, h, channels, i), mode).save(path)
        paths.append(path)
    return paths


def js_pixels(node: str, paths: list[Path], size: int, background: tuple[int, int, int], out: Path) -> list[np.ndarray]:
    rows = cli_json(node, "pixels", "--size", str(size), "--background", ",".join(map(str, background)),
                    "--out", str(out), *map(str, paths))
    return [np.fromfile(row["out"], np.uint8).reshape(size, size, 3) for row in rows]


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# ---------------------------------------------------------------------------------------------
# Preprocessing

@pytest.mark.parametrize("size", [32, 224])
def test_png_pixels_are_exact(node, images, size, tmp_path):
    """Decoding, alpha compositing, EXIF rotation, resize and crop equal clipmodel.images.load_image."""
    background = (30, 200, 90)  # not white, so a wrong composite shows
    pngs = [p for name, p in images.items() if name.endswith(".png")]
    diffs = {p.name: max_diff(js, load_image(p, size, background))
             for p, js in zip(pngs, js_pixels(node, pngs, size, background, tmp_path))}
    measured.setdefault("png_pixel_max_diff", {})[str(size)] = diffs
    assert diffs == dict.fromkeys(diffs, 0)


@pytest.mark.parametrize("size", [16, 224, 257])
def test_resize_sweep_is_exact(node, sweep, size, tmp_path):
    background = (255, 255, 255)
    diffs = {p.name: max_diff(js, load_image(p, size, background))
             for p, js in zip(sweep, js_pixels(node, sweep, size, background, tmp_path))}
    measured.setdefault("sweep_pixel_max_diff", {})[str(size)] = max(diffs.values())
    assert {k: v for k, v in diffs.items() if v} == {}


def test_jpeg_pixels_are_close(node, images, tmp_path):
    """jpeg-js and libjpeg-turbo (under Pillow) decode slightly differently (IDCT, chroma upsampling):
    measured, and bounded loosely enough for that, tightly enough to catch a wrong rotation."""
    jpegs = [p for name, p in images.items() if name.endswith(".jpg")]
    report = {}
    for size in (32, 224):
        for p, js in zip(jpegs, js_pixels(node, jpegs, size, (255, 255, 255), tmp_path)):
            diff = np.abs(js.astype(np.int16) - load_image(p, size).astype(np.int16))
            report[f"{p.name}@{size}"] = {"max": int(diff.max()), "mean": round(float(diff.mean()), 3)}
    measured["jpeg_pixel_diff"] = report
    assert all(r["mean"] < 3 and r["max"] < 64 for r in report.values()), report  # a wrong rotation: mean > 20


# ---------------------------------------------------------------------------------------------
# Text

def test_token_ids_match_python(node, model_dir):
    """Fixed captions plus 500 random strings (mixed scripts, emoji, combining marks, odd whitespace,
    special-token text) tokenise to the same ids as clipmodel's tokenizer."""
    rng = random.Random(0)
    pool = (list("abcxyz ABCXYZ 0123456789.,;:!?'\"-_()[]{}<>/\\@#$%&*+=~|\t\n") +
            list("éüößÆİıΣσςΩбЖЯ日本語中文한국어العربيةעברית") +
            ["😀", "👍🏽", "🇫🇷", "\u0301", "\u200d", "\ufeff", "\u00a0", "\u3000", "\u0085", "'s", "'ll",
             "<end_of_text>", "<pad>", "<start_of_text>", "\r\n"])
    texts = CAPTIONS + ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(500)]
    js = cli_json(node, "tokens", "--model", str(model_dir), "--texts", *texts)
    ids, truncated = encode(load_tokenizer(model_dir / "tokenizer.json"), texts)
    context = json.loads((model_dir / "preprocess.json").read_text())["context_length"]
    padded = np.zeros((len(texts), context), np.int64)  # rows as long as the context, whatever L Python used
    padded[:, :ids.shape[1]] = ids
    mismatched = [t for t, row, p in zip(texts, js, padded) if row["ids"] != p.tolist()]
    assert mismatched == []
    assert [row["truncated"] for row in js] == truncated.tolist()
    assert js[2]["truncated"] and all(row["ids"].count(2) == 1 for row in js)  # one EOT, even for "<end_of_text>"


# ---------------------------------------------------------------------------------------------
# Embeddings and zero-shot

def test_embeddings_match_python(node, model_dir, runtime, images):
    paths = list(images.values())
    started = time.perf_counter()
    js = cli_json(node, "embed", "--model", str(model_dir), "--images", *map(str, paths), "--texts", *CAPTIONS)
    node_seconds = time.perf_counter() - started
    image_cos = (np.array([r["embedding"] for r in js["images"]]) * runtime.encode_images(paths)).sum(1)
    text_cos = (np.array([r["embedding"] for r in js["texts"]]) * runtime.encode_texts(CAPTIONS)).sum(1)
    measured["embedding_cosine"] = {
        "images": {p.name: round(float(c), 7) for p, c in zip(paths, image_cos)},
        "texts": {t[:40]: round(float(c), 7) for t, c in zip(CAPTIONS, text_cos)},
        "min_image": float(image_cos.min()), "min_text": float(text_cos.min()),
        "node_embed_seconds": round(node_seconds, 2)}
    assert image_cos.min() >= MIN_COSINE and text_cos.min() >= MIN_COSINE, measured["embedding_cosine"]


@pytest.mark.parametrize("support_weight", [None, "0", "2.5"])
def test_zero_shot_matches_python(node, model_dir, runtime, images, support_weight):
    """The folder's support set at its own weight (None), none (0), and another weight, as in ClipRuntime."""
    paths = list(images.values())
    weight = () if support_weight is None else ("--support-weight", support_weight)
    js = cli_json(node, "classify", "--model", str(model_dir), "--labels", *LABELS, "--templates", *TEMPLATES,
                  "--top", str(len(LABELS)), *weight, "--", *map(str, paths))
    found = runtime.support
    assert found is not None and found.weight == 1.0
    if support_weight is not None:
        runtime.support = found.with_weight(float(support_weight)) if float(support_weight) else None
    try:
        py = runtime.classify(paths, LABELS, TEMPLATES, k=len(LABELS))
    finally:
        runtime.support = found
    compared, agreed, worst = 0, 0, {".png": 0.0, ".jpg": 0.0}
    for path, js_row, py_row in zip(paths, js, py):
        js_probs = {r["label"]: r["prob"] for r in js_row["top"]}
        worst[path.suffix] = max(worst[path.suffix], max(abs(js_probs[label] - p) for label, p in py_row))
        if py_row[0][1] - py_row[1][1] > MARGIN:
            compared += 1
            agreed += js_row["top"][0]["label"] == py_row[0][0]
    result = measured.setdefault("zero_shot", {})[f"support_weight_{support_weight or 'default'}"] = {
        "images": len(paths), "compared": compared, "top1_agree": agreed,
        "max_prob_diff_png": worst[".png"], "max_prob_diff_jpeg": worst[".jpg"]}
    assert compared >= len(paths) // 2, "too many near ties to say anything: change the labels"
    # Same pixels (PNG): only float rounding apart. JPEG: the decoders' differences move probabilities a little.
    assert agreed == compared and worst[".png"] < 1e-4 and worst[".jpg"] < 0.02, result


def test_onnxruntime_node_telemetry_is_off(node, model_dir, tmp_path):
    """onnxruntime-node writes its telemetry device id and event cache where a bare session runs, and
    nothing where clip.mjs runs: it imports no-telemetry.mjs first."""
    bare = ("import * as ort from 'onnxruntime-node'; "
            f"await ort.InferenceSession.create({json.dumps(str(model_dir / 'text_encoder.onnx'))});")
    written = files_written([node, "--input-type=module", "-e", bare], tmp_path / "bare", cwd=NODE_DIR)
    if not written:
        pytest.skip("this onnxruntime-node writes no telemetry files: nothing to turn off")
    assert any(p.endswith(".onnxruntime/deviceid") for p in written), written
    assert files_written([node, str(CLI), "embed", "--model", str(model_dir), "--texts", "a cat"], tmp_path / "cli") == []


def test_cli_errors_name_the_problem(node, model_dir, images, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    proc = run_cli(node, "embed", "--model", str(model_dir), "--images", str(not_image))
    assert proc.returncode == 1 and "notes.png" in proc.stderr and "not a PNG or JPEG" in proc.stderr
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(100_000, 100_000))  # refused from its header, before any pixel is inflated
    proc = run_cli(node, "pixels", "--size", "32", "--out", str(tmp_path), str(bomb))
    assert proc.returncode == 1 and "too many pixels" in proc.stderr
    proc = run_cli(node, "embed", "--model", str(tmp_path), "--texts", "x")
    assert proc.returncode == 1 and "not an exported model folder" in proc.stderr
    proc = run_cli(node, "classify", "--model", str(model_dir), "--labels", "a", "--templates", "no braces", "--", "x")
    assert proc.returncode == 2 and "{}" in proc.stderr
    assert run_cli(node, "nonsense").returncode == 2
    for weight in ("-1", "nan", "inf", "x"):
        proc = run_cli(node, "classify", "--model", str(model_dir), "--labels", "a", "--support-weight", weight, "--", "x")
        assert proc.returncode == 2 and "--support-weight must be a finite number >= 0" in proc.stderr, weight
    plain = tmp_path / "plain"  # a folder exported before evaluate wrote a support set
    shutil.copytree(model_dir, plain, ignore=shutil.ignore_patterns(SUPPORT_FILE))
    pre = json.loads((plain / "preprocess.json").read_text())
    (plain / "preprocess.json").write_text(json.dumps({**pre, "support": None}))
    image = str(images["rgb_97x61.png"])
    proc = run_cli(node, "classify", "--model", str(plain), "--labels", "a", "b", "--support-weight", "1", "--", image)
    assert proc.returncode == 2 and f"has no {SUPPORT_FILE}" in proc.stderr
    assert len(cli_json(node, "classify", "--model", str(plain), "--labels", "a", "b", "--", image)) == 1
    unweighted = tmp_path / "unweighted"  # listed at weight 0 (the synthetic recipe's): not fetched unless reweighted
    shutil.copytree(model_dir, unweighted, ignore=shutil.ignore_patterns(SUPPORT_FILE))
    (unweighted / "preprocess.json").write_text(json.dumps({**pre, "support": {**pre["support"], "weight": 0.0}}))
    assert len(cli_json(node, "classify", "--model", str(unweighted), "--labels", "a", "b", "--", image)) == 1
    proc = run_cli(node, "classify", "--model", str(unweighted), "--labels", "a", "b", "--support-weight", "1", "--", image)
    assert proc.returncode == 1 and f"missing {SUPPORT_FILE}" in proc.stderr
    proc = run_cli(node, "classify", "--model", str(model_dir), "--labels", "a, b", "--", image)
    assert proc.returncode == 0 and 'one label, "a, b": labels are separate arguments' in proc.stderr
    (plain / "preprocess.json").write_text(json.dumps(pre))  # listed but missing: named
    proc = run_cli(node, "classify", "--model", str(plain), "--labels", "a", "--", image)
    assert proc.returncode == 1 and SUPPORT_FILE in proc.stderr
    (plain / SUPPORT_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # truncated
    proc = run_cli(node, "classify", "--model", str(plain), "--labels", "a", "--", image)
    assert proc.returncode == 1 and SUPPORT_FILE in proc.stderr


# ---------------------------------------------------------------------------------------------
# The web page in headless Chromium

@pytest.fixture(scope="module")
def browser(node):
    require((WEB_DIR / "node_modules" / "onnxruntime-web").is_dir(),
            "examples/web/node_modules missing: run `npm ci` in examples/web")
    require(CHROMIUM.exists() and CHROMEDRIVER.exists(),
            "Chromium not found: apt-get install -y chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        require(False, "selenium not installed: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit chromedriver: selenium-manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page_url(model_dir):
    sys.path.insert(0, str(WEB_DIR))
    try:
        from serve import make_server
    finally:
        sys.path.remove(str(WEB_DIR))
    server = make_server(model_dir, port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/web/"
    server.shutdown()
    server.server_close()


def wait_for(driver, css: str, states: tuple[str, ...], timeout: float = 120) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    element = lambda: driver.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    try:
        WebDriverWait(driver, timeout).until(lambda _: element().get_attribute("data-state") in states)
    except Exception:
        logs = "\n".join(str(entry) for entry in driver.get_log("browser"))
        raise AssertionError(f"{css} never reached {states}: {element().text!r}\nbrowser log:\n{logs}") from None
    return element().get_attribute("data-state")


def classify_in_page(browser, path: Path) -> dict:
    """Choose `path` in the page's file input and wait for its scores; the page's pixels, embedding, scores."""
    from selenium.webdriver.common.by import By
    browser.execute_script("document.querySelector('#results').dataset.state = 'waiting'")
    browser.find_element(By.ID, "image-input").send_keys(str(path))
    assert wait_for(browser, "#results", ("done", "error")) == "done", browser.find_element(By.ID, "image-info").text
    return browser.execute_script(
        "const s = window.clipDemo; return {pixels: Array.from(s.pixels), embedding: Array.from(s.embedding),"
        " scores: s.scores, top: document.querySelector('#results').dataset.top}")


# Opaque and transparent PNGs, EXIF-rotated and progressive JPEGs: decoded by Chromium itself.
WEB_IMAGES = ["rgba_noise.png", "rgba_gradient_alpha.png", "exif6.jpg", "large_progressive.jpg", "rgb_97x61.png"]


@pytest.mark.slow
def test_web_page_classifies_like_python(browser, page_url, runtime, images, tmp_path):
    from selenium.webdriver.common.by import By
    started = time.perf_counter()
    browser.get(page_url)
    assert wait_for(browser, "#model-status", ("ready", "error")) == "ready", \
        browser.find_element(By.ID, "model-status").text
    labels = browser.find_element(By.ID, "labels")
    labels.clear()
    labels.send_keys("\n".join(LABELS))
    size, templates = runtime.pre.image_size, runtime_templates(runtime)
    report = {}
    for name in WEB_IMAGES:
        page = classify_in_page(browser, images[name])
        diff = np.abs(np.array(page["pixels"], np.int16).reshape(size, size, 3) - load_image(images[name], size))
        py = runtime.classify([images[name]], LABELS, templates, k=len(LABELS))[0]
        report[name] = {"pixel_max_diff": int(diff.max()), "pixel_mean_diff": round(float(diff.mean()), 3),
                        "cosine": float(np.dot(page["embedding"], runtime.encode_images([images[name]])[0])),
                        "top1_page": page["top"], "top1_python": py[0][0], "python_margin": py[0][1] - py[1][1]}
    shot = tmp_path / "web_client.png"  # the page as left by the last image
    browser.save_screenshot(str(shot))
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copy(shot, SCREENSHOT)
    measured["web"] = {"images": report, "seconds": round(time.perf_counter() - started, 2)}
    for name, r in report.items():
        # The canvas may hold premultiplied alpha and the browser has its own JPEG decoder: PNG pixels
        # must be exact (opaque ones at least), JPEG ones close; every embedding as close as the Node client's.
        exact = name.endswith(".png") and "rgba" not in name
        assert (r["pixel_max_diff"] == 0 if exact else r["pixel_mean_diff"] < 3), (name, r)
        assert r["cosine"] >= MIN_COSINE, (name, r)
        if r["python_margin"] > MARGIN:
            assert r["top1_page"] == r["top1_python"], (name, r)
    assert report["rgb_97x61.png"]["python_margin"] > MARGIN, "near tie in Python: change the labels"


def runtime_templates(runtime: ClipRuntime) -> list[str]:
    """The templates the page starts with: preprocess.json's, or clipmodel's default."""
    pre = json.loads((runtime.folder / "preprocess.json").read_text())
    return pre.get("templates") or ["{}"]


@pytest.mark.slow
def test_web_page_searches_a_folder(browser, page_url, runtime, images, tmp_path):
    """The second tab: a folder of images indexed in the browser, ranked by a text query like Python's."""
    from selenium.webdriver.common.by import By
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("rgb_97x61.png", "rgba_noise.png", "grey.png", "exif6.png", "tiny_5x3.png"):
        shutil.copy(images[name], folder / name)
    browser.get(page_url)
    assert wait_for(browser, "#model-status", ("ready", "error")) == "ready"
    browser.find_element(By.CSS_SELECTOR, '[data-tab="search-tab"]').click()
    browser.find_element(By.ID, "folder-input").send_keys(str(folder))
    assert wait_for(browser, "#index-status", ("ready", "error")) == "ready"
    browser.find_element(By.ID, "query").send_keys(LABELS[0])
    browser.find_element(By.ID, "search").click()
    assert wait_for(browser, "#hits", ("done",)) == "done"
    hits = browser.execute_script("return window.clipDemo.hits")
    py = runtime.search(LABELS[0], folder, top=len(hits), cache_dir=tmp_path / "cache")
    js_scores = {Path(h["name"]).name: h["score"] for h in hits}
    assert js_scores.keys() == {p.name for p, _ in py}
    assert max(abs(js_scores[p.name] - s) for p, s in py) < 1e-4
    if py[0][1] - py[1][1] > MARGIN:
        assert Path(hits[0]["name"]).name == py[0][0].name
