"""A real benchmark in another domain: type designers' glyphs, named by the Unicode Standard.

real/params.yaml was chosen on emoji artwork, and hidden real sets check the same capability on
data nobody here has seen. This builds a benchmark of the same shape from material every install
of the project has (the fonts matplotlib ships), drawn and named by people outside this project:
each character a font draws, captioned with its Unicode name and tags (block, script, general category), e.g.
`latin small letter e with acute (latin-1 supplement, latin, lowercase letter)`: a name, then tags,
the form of real-emoji's captions, so the recipe's caption views apply unchanged. Then
`real_zero_shot.py --data` runs both trainers on it unchanged:

- train.csv: DejaVu Sans's glyphs of 80% of the characters (a salted hash of the code point puts
  each character on one side);
- eval_cross_style.csv: the same characters drawn by STIX General (another foundry's design, a
  Times-like serif), labelled by name;
- eval_unseen.csv: the other 20% (names never trained on, `latin capital letter e with acute`
  beside a trained `latin small letter e with acute`), in both fonts.

Only letters, digits, punctuation and symbols with a name and some ink are kept (no combining
marks, spaces or controls). A glyph is drawn black on white at 72x72 px, 48 px type, placed on its
baseline as type is (a comma stays low, a hyphen mid-height), and shrunk only where it would not fit.
Some glyphs of different characters are pixel-identical (Latin `a` and Cyrillic `а`): ingest merges
them in training, and in the held-out sets they are an ambiguity both trainers share.

    python benchmarks/real_glyphs.py OUT [--fonts DIR]     # DIR: matplotlib's fonts/ttf by default
    python benchmarks/real_zero_shot.py --data OUT --epochs 20 --out reports/benchmarks/real_glyphs_e20_s0.json

Raises SystemExit (one line) if a font is missing.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import unicodedata
from pathlib import Path

import matplotlib
import pandas as pd
from fontTools import unicodedata as ucd
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clipmodel.io import atomic_path  # noqa: E402

FONTS = {"dejavu": "DejaVuSans.ttf", "stix": "STIXGeneral.ttf"}  # the training style, the other style
SIZE, TYPE_PX = 72, 48
UNSEEN_FRACTION = 0.2
CATEGORY = {"Lu": "uppercase letter", "Ll": "lowercase letter", "Lt": "titlecase letter", "Lm": "modifier letter",
            "Lo": "other letter", "Nd": "decimal digit", "Nl": "letter number", "No": "other number",
            "Pc": "connector punctuation", "Pd": "dash", "Ps": "opening punctuation", "Pe": "closing punctuation",
            "Pi": "initial quote", "Pf": "final quote", "Po": "other punctuation", "Sm": "math symbol",
            "Sc": "currency symbol", "Sk": "modifier symbol", "So": "other symbol"}


def characters(font: Path) -> list[str]:
    """The characters `font` maps that have a name and a kept category, in code point order."""
    return [chr(c) for c in sorted(TTFont(font).getBestCmap())
            if unicodedata.category(chr(c)) in CATEGORY and unicodedata.name(chr(c), "")]


def caption(ch: str) -> str:
    """`name (block, script, category)`, lower case; a tag the name already holds is left out."""
    name = unicodedata.name(ch).lower()
    script = ucd.script_name(ucd.script(ch)).lower()
    tags = [ucd.block(ch).lower(), "" if script in ("common", "inherited") else script,
            CATEGORY[unicodedata.category(ch)]]
    tags = [t for t in dict.fromkeys(tags) if t and t not in name]
    return f"{name} ({', '.join(tags)})" if tags else name


def unseen(ch: str) -> bool:
    digest = hashlib.sha256(f"real_glyphs:{ord(ch):X}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < UNSEEN_FRACTION


def draw(ch: str, font_path: Path) -> Image.Image | None:
    """`ch` black on white, SIZE px square: the em box's baseline at a fixed height and the ink centred
    across; the type shrinks until the ink fits. None for a glyph with no ink."""
    for px in range(TYPE_PX, 7, -4):
        font = ImageFont.truetype(str(font_path), px)
        box = font.getbbox(ch, anchor="ls")  # relative to the left end of the baseline
        if box[2] <= box[0] or box[3] <= box[1]:
            return None
        if box[2] - box[0] <= SIZE - 4 and box[3] - box[1] <= SIZE - 4:
            break
    ascent, descent = font.getmetrics()
    baseline = (SIZE - (ascent + descent)) / 2 + ascent
    baseline = min(max(baseline, 2 - box[1]), SIZE - 2 - box[3])  # keep every stroke on the canvas
    img = Image.new("RGB", (SIZE, SIZE), "white")
    ImageDraw.Draw(img).text(((SIZE - (box[2] - box[0])) / 2 - box[0], baseline), ch, font=font, fill="black",
                             anchor="ls")
    return img if img.getbbox() is not None and img.convert("L").getextrema()[0] < 255 else None


def build(out: Path, fonts: Path) -> dict[str, pd.DataFrame]:
    """Draw every kept glyph of both fonts into `out/images/<style>/<code point>.png` and return the
    three CSVs as DataFrames, image paths relative to `out`. Characters only the other font draws are
    left out: their names would be unseen in one style only."""
    drawn: dict[str, dict[str, str]] = {}
    for style, file in FONTS.items():
        (out / "images" / style).mkdir(parents=True, exist_ok=True)
        drawn[style] = {}
        for ch in characters(fonts / file):
            img = draw(ch, fonts / file)
            if img is not None:
                rel = f"images/{style}/{ord(ch):04X}.png"
                img.save(out / rel)
                drawn[style][ch] = rel
    trained, other = drawn.values()
    train = [(rel, caption(ch)) for ch, rel in trained.items() if not unseen(ch)]
    cross = [(rel, unicodedata.name(ch).lower()) for ch, rel in other.items() if ch in trained and not unseen(ch)]
    held = [(rel, unicodedata.name(ch).lower()) for style in drawn.values() for ch, rel in style.items()
            if unseen(ch) and ch in trained]
    return {"train.csv": pd.DataFrame(train, columns=["filepath", "caption"]),
            "eval_cross_style.csv": pd.DataFrame(cross, columns=["image", "label"]),
            "eval_unseen.csv": pd.DataFrame(held, columns=["image", "label"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="a folder for the CSVs and images (created)")
    ap.add_argument("--fonts", type=Path, default=Path(matplotlib.get_data_path()) / "fonts" / "ttf",
                    help=f"the folder holding {' and '.join(FONTS.values())} (default: matplotlib's)")
    args = ap.parse_args()
    for file in FONTS.values():
        if not (args.fonts / file).is_file():
            sys.exit(f"real_glyphs: {args.fonts / file}: not found (--fonts names the folder holding it)")
    for name, frame in build(args.out, args.fonts).items():
        with atomic_path(args.out / name) as tmp:
            frame.to_csv(tmp, index=False)
        print(f"{args.out / name}: {len(frame)} rows, {frame.iloc[:, 1].nunique()} distinct")


if __name__ == "__main__":
    main()
