"""benchmarks/real_glyphs.py: a real benchmark from type designers' glyphs and their Unicode names."""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import numpy as np
from fontTools import subset
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.real_glyphs import FONTS, build, caption, unseen  # noqa: E402

TEXT = "aáAÁeéEÉ.,-_1234567890ℝ∫→←♥ßЖж"


def small_fonts(folder: Path) -> Path:
    """matplotlib's two fonts cut down to TEXT's characters (and a control and a space, which are left out)."""
    folder.mkdir()
    for file in FONTS.values():
        subset.main([str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / file), f"--text={TEXT} \t",
                     f"--output-file={folder / file}"])
    return folder


def test_captions_are_a_name_then_tags_the_name_lacks():
    assert caption("é") == "latin small letter e with acute (latin-1 supplement, lowercase letter)"
    assert caption("→") == "rightwards arrow (arrows, math symbol)"
    assert caption("ж") == "cyrillic small letter zhe (lowercase letter)"  # block and script are in the name


def test_the_benchmark_splits_characters_and_styles(tmp_path):
    frames = build(tmp_path / "out", small_fonts(tmp_path / "fonts"))
    train, cross, held = frames["train.csv"], frames["eval_cross_style.csv"], frames["eval_unseen.csv"]
    trained = {c.split(" (")[0] for c in train.caption}
    assert len(trained) + held.label.nunique() == len(TEXT)  # every character once, on one side
    assert not trained & set(held.label)
    assert set(cross.label) <= trained and all(p.startswith("images/stix/") for p in cross.image)
    assert all(p.startswith("images/dejavu/") for p in train.filepath)
    assert {p.split("/")[1] for p in held.image} == {"dejavu", "stix"}
    assert all(unseen(chr(int(Path(p).stem, 16))) for p in held.image)
    # type sits on its baseline: a full stop's ink is low, a hyphen's mid-height, a letter's above the stop's
    rows = {ch: np.flatnonzero((np.asarray(Image.open(tmp_path / "out" / f"images/dejavu/{ord(ch):04X}.png").convert("L"))
                                < 128).any(1)) for ch in ".-a"}
    assert rows["."].min() > rows["-"].max() and rows["a"].max() >= rows["."].max() - 2 and rows["-"].min() > 20
