"""MODEL.md: what a client in any language needs to turn a file or a caption into the exported
encoders' embedding, and what the model is, as markdown. The image and text steps also go into
preprocess.json (`clipmodel.export`)."""
from __future__ import annotations

# Every step between a file on disk and the image graph's input, in the order `clipmodel.images` runs them:
# what a client in another language implements (examples/node/preprocess.mjs is one, tested pixel-exact).
IMAGE_STEPS = [
    "decode the file (PNG, JPEG, ...) to its stored pixels",
    "apply the EXIF orientation tag of any format that carries one (JPEG, PNG, WebP, TIFF), as PIL's "
    "ImageOps.exif_transpose",
    "16-bit greyscale: divide by 257 and round half to even; float greyscale in [0, 1]: multiply by 255 and round",
    "alpha (RGBA, LA, PA, or a transparent colour: a palette's tRNS alpha per entry, a greyscale or RGB "
    "pixel equal to the file's transparent value gets alpha 0, every other 255; Pillow's convert('RGBA')): "
    "composite over an opaque `background`, per channel out = round((c * a + bg * (255 - a)) / 255) (equal "
    "to Pillow's Image.alpha_composite for every c, a; no ties occur); then drop alpha",
    "every other mode to RGB as Pillow's convert('RGB') does: greyscale and palette expand (R = G = B = "
    "grey; a palette entry's colour), bilevel '1' is 0 or 255, CMYK gives R = 255 - min(255, C + K), G and B "
    "likewise from M and Y; YCbCr and LAB by Pillow's conversions",
    "sizes: S = image_size; short, long = the smaller and larger of W, H; new_long = int(S * long / short) "
    "(truncated); (new_w, new_h) = (S, new_long) if W <= H else (new_long, S); crop offsets "
    "left = round((new_w - S) / 2), top = round((new_h - S) / 2), halves to even",
    "if new_long <= 8 * S: resize the whole image to new_w x new_h (`resize` below, box = (0, 0, W, H)), then "
    "keep the S x S region at (left, top); if new_long > 8 * S (a strip): resize only the source box "
    "(left * W / new_w, top * H / new_h, (left + S) * W / new_w, (top + S) * H / new_h), straight to S x S",
    "`resize` (Pillow's 8-bit antialiased bicubic, Image.resize with BICUBIC): the four box edges are first "
    "rounded to float32; a box of whole pixels exactly the output's size is a plain crop; otherwise two "
    "separable passes, horizontal (W -> out_w; skipped when out_w == W and the box's x edges are exactly 0 "
    "and out_w) and vertical (the same with H, y), each rounding to uint8 before the other reads it",
    "pass order: horizontal first, except with Pillow >= 13.0 when H - out_h > 0 and "
    "H - out_h > 2 * (W - out_w) (vertical first); Pillow 12.2-12.3: vertical first when H > 100 * W and "
    "out_h < H; earlier: always horizontal first (W, H: the whole image's size whatever the box)",
    "coefficients, per axis of input size n, box edges (b0, b1), output size m: scale = (b1 - b0) / m "
    "(the subtraction in float32, the division in float64), "
    "fscale = max(scale, 1), support = 2 * fscale; for output pixel i: centre = b0 + (i + 0.5) * scale, "
    "lo = max(0, int(centre - support + 0.5)), hi = min(n, int(centre + support + 0.5)); weight of input pixel "
    "x in [lo, hi) = k((x - centre + 0.5) / fscale), k the cubic kernel with a = -0.5 (k(t) = (a+2)|t|^3 - "
    "(a+3)|t|^2 + 1 for |t| < 1, a(|t|^3 - 5|t|^2 + 8|t| - 4) for |t| < 2, else 0); weights divided by their sum "
    "(when it is not 0), then to 22-bit fixed point: int(w * 2^22 + 0.5) for w >= 0, int(w * 2^22 - 0.5) "
    "for w < 0 (truncating toward zero)",
    "each output channel value = (2^21 + sum of pixel * fixed-point weight) >> 22 (arithmetic shift), "
    "clipped to 0..255 (a first pass may compute only the rows or columns the second reads: the same result)",
    "to float32: value / 255, then (x - mean) / std per RGB channel, channels first: float32 [N, 3, S, S]",
]
TEXT_STEPS = [
    "encode with tokenizer.json (NFC, lower-case, whitespace runs to one space, strip; letter runs, digit "
    "runs and other non-space runs split apart, each with the byte-level space mark; byte-level BPE); "
    "the file has no added tokens, so no caption text can produce the pad, SOT or EOT ids. The file's own "
    "truncation, post-processor and padding do steps 2 and 3 (padding to context_length): with Hugging Face "
    "`tokenizers`, `Tokenizer.from_file(\"tokenizer.json\").encode(caption).ids` is the model's input as it is, "
    "so do not add SOT and EOT again; a client with its own BPE, or one that turns those settings off, does "
    "steps 2 and 3 itself",
    "keep the first context_length - 2 BPE ids; then [sot_id] + ids + [eot_id]; EOT is always last",
    "pad with pad_id to one length L <= context_length for the whole batch (the longest caption's is the "
    "fastest; trailing pads change nothing); the graph reads the feature at the last non-pad position",
]


def format_line(fmt: dict) -> str:
    """One sentence on what runs the graphs, from `clipmodel.export.onnx_format`'s dict."""
    return (f"ONNX IR version {fmt['ir_version']}, operator sets {', '.join(f'{d} {v}' for d, v in fmt['opsets'].items())}; "
            f"checked against torch with {fmt['checked_with']}. A runtime that implements that IR version and "
            "those opsets runs them (onnxruntime's compatibility table maps each of its releases to both).")


def _numbered(items: list[str]) -> str:
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))


def _support_steps(support: dict | None) -> str:
    if not support:
        return "This folder has no support set: a class vector is its text embedding t alone, so score = cosine.\n"
    return f"""
With `{support["file"]}` (safetensors: `images` float32 [M, D], `captions` float32 [K, D], `caption_image`
int64 [K]; the training images and captions, embedded and L2-normalised), each class vector t also gets
weight ({support["weight"]}) x s added, unnormalised, where s is the L2-normalised sum over captions k of
softmax_k(t . captions[k] / temperature ({support["temperature"]})) x images[caption_image[k]] (the project's
clipmodel/support.py, after SuS-X, Udandarao et al. 2023). The score is then image . (t + weight s) for the
unit image embedding: not a cosine, since t + weight s is not renormalised. Weight 0 is plain zero-shot
(score = cosine); the Metrics below were measured at weight {support["weight"]}.
"""


def model_card(pre: dict, config: dict, metrics: dict[str, float], sets: dict[str, str],
               training_data: str | None = None) -> str:
    """MODEL.md: what a client in any language needs to reproduce `ClipRuntime`'s embeddings, as markdown;
    `metrics` (name -> value) are listed as measured by the pipeline's evaluate stage, `sets` (held-out
    set name -> what it is: file, images, classes) beside them; `training_data` says what the model
    learnt from and under what licence."""
    support_file = f"\n- `{pre['support']['file']}`: the support set (see Zero-shot classification)." if pre["support"] else ""
    return f"""# CLIP encoders (ONNX)

Trained from scratch by this project's pipeline on: {training_data or "(not described: the pipeline's "
"export.dataset and export.dataset_license in params.yaml say it)"}; data fingerprint
`{config.get("data_fingerprint", "unknown")}`. This project adds no licence terms to the weights; whether
they fall under that data's licence (a share-alike one, say), and what attribution it asks for, is
for that licence to say.

## Files
- `image_encoder.onnx`: input `pixels` float32 [N, 3, {pre["image_size"]}, {pre["image_size"]}] (see Image steps),
  output `embedding` float32 [N, {pre["embed_dim"]}], L2-normalised.
- `text_encoder.onnx`: input `tokens` int64 [N, L], 1 <= L <= {pre["context_length"]} (see Text steps), output `embedding`
  float32 [N, {pre["embed_dim"]}], L2-normalised.
- `tokenizer.json`: HF `tokenizers` byte-level BPE; `preprocess.json`: every constant below, machine-readable
  (the same keys are in each graph's metadata_props).{support_file}
- Format: {format_line(pre["onnx"])}

## Image steps
image_size {pre["image_size"]}, background RGB {pre["background"]}, mean {pre["mean"]}, std {pre["std"]},
Pillow {pre["pillow"]} (`pillow`: whose resize the steps below reproduce).

{_numbered(pre["image_steps"])}

## Text steps
context_length {pre["context_length"]}, pad_id {pre["pad_id"]}, sot_id {pre["sot_id"]}, eot_id {pre["eot_id"]}.

{_numbered(pre["text_steps"])}

## Zero-shot classification
For each class, format every template in `templates` ({pre["templates"]}) with the class name, embed the
prompts, average them and L2-normalise the mean (prompt ensembling, Radford et al. 2021 sec. 3.1.4).
The image goes to the class of highest score; probabilities: softmax over classes of logit_scale
({pre["logit_scale"]:.4f}) x score(image, class), the cosine of the image and class vectors unless a
support set (below) is used.
{_support_steps(pre["support"])}
## Metrics
As the pipeline's evaluate stage measured them (fractions): `zero_shot.<task or set>.top1` with the
support set when this folder has one, `top1_without_support` with the text vectors alone:
{chr(10).join(f"- {k}: {v:.4f}" for k, v in metrics.items()) or "None were passed to the export."}

The held-out sets (images never trained on; paths as the pipeline read them, from its folder):
{chr(10).join(f"- {k}: {v}" for k, v in sets.items()) or "None."}

Each task or set was scored with its own templates (`evaluated_templates`); pass the same list (the
project's `clip-onnx` CLI takes `--templates FILE`, one per line; its Node and web clients a
`templates` option) to reproduce its figure or to classify images like that task's:
{chr(10).join(f"- {k}: {v}" for k, v in pre["evaluated_templates"].items()) or "None were passed to the export."}

## Limitations
The encoders see {pre["image_size"]}x{pre["image_size"]} pixels and know only what the training captions
named. The figures above, on held-out images, are what to expect on images like those; other kinds
of image (photographs for a model trained on artwork, other styles, other subjects) score lower,
and class names in words its captions never used score near chance. Zero-shot picks among the class
names it is given: a list without the right name still gets a confident answer.
"""
