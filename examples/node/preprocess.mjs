// Image preprocessing of clipmodel (clipmodel/images.py), ported to plain JavaScript so that a client
// feeds the image encoder exactly the pixels Python would: EXIF orientation, alpha composited onto the
// background, shorter side resized with Pillow's antialiased bicubic filter, centre crop.
//
// No Node or browser API is used here: the Node CLI and the web page import this same file.
// Images are plain objects {width, height, data}, data holding 8-bit pixels row by row, 4 channels
// (RGBA, as pngjs, jpeg-js and canvas getImageData give them) or 3 (RGB).
//
// The resampler follows the algorithm of Pillow's libImaging/Resample.c (separable two-pass
// convolution, fixed-point coefficients, 8-bit intermediate image) so that results are bit-exact.

const STRIP_RATIO = 8; // clipmodel.images.STRIP_RATIO: past this aspect ratio only the crop is resampled

// ---------------------------------------------------------------------------------------------
// EXIF orientation (ImageOps.exif_transpose)

// For each EXIF orientation 1..8: whether width and height swap, and where output pixel (x, y) of
// the upright image comes from in the stored image of size (w, h).
const ORIENTATIONS = {
  1: { swap: false, src: (x, y, w, h) => [x, y] },
  2: { swap: false, src: (x, y, w, h) => [w - 1 - x, y] },            // FLIP_LEFT_RIGHT
  3: { swap: false, src: (x, y, w, h) => [w - 1 - x, h - 1 - y] },    // ROTATE_180
  4: { swap: false, src: (x, y, w, h) => [x, h - 1 - y] },            // FLIP_TOP_BOTTOM
  5: { swap: true, src: (x, y, w, h) => [y, x] },                     // TRANSPOSE
  6: { swap: true, src: (x, y, w, h) => [y, h - 1 - x] },             // ROTATE_270 (90 degrees clockwise)
  7: { swap: true, src: (x, y, w, h) => [w - 1 - y, h - 1 - x] },     // TRANSVERSE
  8: { swap: true, src: (x, y, w, h) => [w - 1 - y, x] },             // ROTATE_90 (counter-clockwise)
};

/** The image turned upright for an EXIF orientation tag (1..8); other values leave it as it is. */
export function applyOrientation(image, orientation) {
  const spec = ORIENTATIONS[orientation];
  if (!spec || orientation === 1) return image;
  const { width: w, height: h, data } = image;
  const channels = data.length / (w * h);
  const [outW, outH] = spec.swap ? [h, w] : [w, h];
  const out = new Uint8Array(data.length);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const [sx, sy] = spec.src(x, y, w, h);
      const from = (sy * w + sx) * channels;
      const to = (y * outW + x) * channels;
      for (let c = 0; c < channels; c++) out[to + c] = data[from + c];
    }
  }
  return { width: outW, height: outH, data: out };
}

// ---------------------------------------------------------------------------------------------
// Alpha (Image.alpha_composite onto an opaque background, then convert("RGB"))

/**
 * RGB image from an RGBA one, composited onto `background` ([r, g, b], 8-bit) with the integer
 * arithmetic of Pillow's AlphaComposite.c. Opaque pixels come out unchanged and fully transparent
 * ones as the background, so compositing an image without alpha is harmless.
 */
export function compositeOnto(image, background) {
  const { width, height, data } = image;
  if (data.length === width * height * 3) return image; // already RGB: nothing to composite
  const out = new Uint8Array(width * height * 3);
  const [br, bg, bb] = background;
  for (let i = 0, o = 0; i < data.length; i += 4, o += 3) {
    const a = data[i + 3];
    out[o] = blendChannel(data[i], br, a);
    out[o + 1] = blendChannel(data[i + 1], bg, a);
    out[o + 2] = blendChannel(data[i + 2], bb, a);
  }
  return { width, height, data: out };
}

const BLEND_BITS = 7; // AlphaComposite.c's PRECISION_BITS
const shiftForDiv255 = (v) => ((v >>> 8) + v) >>> 8; // rounds v / 255 as Pillow does

/** One channel of Pillow's alpha_composite with an opaque destination (alpha 255). */
function blendChannel(src, dst, srcAlpha) {
  if (srcAlpha === 0) return dst;
  // Pillow's general formula, with the destination alpha fixed at 255.
  const dstAlpha = 255;
  const blend = dstAlpha * (255 - srcAlpha);
  const outAlpha255 = srcAlpha * 255 + blend;
  const coef1 = Math.floor((srcAlpha * 255 * 255 * (1 << BLEND_BITS)) / outAlpha255);
  const coef2 = 255 * (1 << BLEND_BITS) - coef1;
  const tmp = src * coef1 + dst * coef2;
  return shiftForDiv255(tmp + (0x80 << BLEND_BITS)) >>> BLEND_BITS;
}

// ---------------------------------------------------------------------------------------------
// Pillow's antialiased bicubic resample (Image.resize(size, BICUBIC, box)) for 8-bit RGB

const PRECISION_BITS = 32 - 8 - 2; // Resample.c: 8 bits of result, 2 for overshoot, 22 of fraction
const BICUBIC_SUPPORT = 2.0;

/** Keys' cubic convolution kernel with a = -0.5, as Pillow evaluates it. */
function bicubicFilter(x) {
  const a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

/**
 * Per output pixel along one axis: the first input pixel used (bounds[2i]), how many are used
 * (bounds[2i+1]) and their fixed-point weights (weights[i * ksize + j]). in0 and in1 are the box's
 * edges in input pixels (already rounded to C floats).
 */
function precomputeCoeffs(inSize, in0, in1, outSize) {
  const scale = Math.fround(in1 - in0) / outSize; // float subtraction, double division
  const filterScale = Math.max(scale, 1.0); // upscaling keeps the kernel's own width
  const support = BICUBIC_SUPPORT * filterScale; // downscaling widens it: the antialiasing
  const ksize = Math.ceil(support) * 2 + 1;
  const invFilterScale = 1.0 / filterScale;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = in0 + (xx + 0.5) * scale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const count = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let sum = 0.0;
    for (let x = 0; x < count; x++) {
      k[x] = bicubicFilter((x + xmin - center + 0.5) * invFilterScale);
      sum += k[x];
    }
    for (let x = 0; x < count; x++) {
      const w = sum !== 0.0 ? k[x] / sum : k[x];
      // normalize_coeffs_8bpc: round half away from zero, then C's truncating int cast.
      weights[xx * ksize + x] = Math.trunc(w < 0 ? -0.5 + w * (1 << PRECISION_BITS) : 0.5 + w * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = count;
  }
  return { ksize, bounds, weights };
}

/** Fixed-point sum back to 8 bits, clipped (Resample.c's clip8). */
function clip8(sum) {
  const v = sum >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/** Horizontal pass over rows [rowStart, rowStart + rows) of an RGB image; returns an RGB image outW x rows. */
function resampleHorizontal(src, srcWidth, rowStart, rows, outW, coeffs) {
  const { ksize, bounds, weights } = coeffs;
  const out = new Uint8Array(outW * rows * 3);
  const half = 1 << (PRECISION_BITS - 1); // rounds the final shift to nearest
  for (let yy = 0; yy < rows; yy++) {
    const line = (yy + rowStart) * srcWidth * 3;
    for (let xx = 0; xx < outW; xx++) {
      const xmin = bounds[xx * 2];
      const count = bounds[xx * 2 + 1];
      const kOff = xx * ksize;
      let s0 = half, s1 = half, s2 = half;
      for (let x = 0; x < count; x++) {
        const w = weights[kOff + x];
        const p = line + (x + xmin) * 3;
        s0 += src[p] * w;
        s1 += src[p + 1] * w;
        s2 += src[p + 2] * w;
      }
      const o = (yy * outW + xx) * 3;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
    }
  }
  return out;
}

/** Vertical pass: an RGB image `width` wide whose row 0 is input row `rowOffset` -> width x outH. */
function resampleVertical(src, width, outH, coeffs, rowOffset) {
  const { ksize, bounds, weights } = coeffs;
  const out = new Uint8Array(width * outH * 3);
  const half = 1 << (PRECISION_BITS - 1);
  const stride = width * 3;
  for (let yy = 0; yy < outH; yy++) {
    const ymin = bounds[yy * 2] - rowOffset;
    const count = bounds[yy * 2 + 1];
    const kOff = yy * ksize;
    for (let xx = 0; xx < width; xx++) {
      let s0 = half, s1 = half, s2 = half;
      for (let y = 0; y < count; y++) {
        const w = weights[kOff + y];
        const p = (y + ymin) * stride + xx * 3;
        s0 += src[p] * w;
        s1 += src[p + 1] * w;
        s2 += src[p + 2] * w;
      }
      const o = yy * stride + xx * 3;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
    }
  }
  return out;
}

/**
 * Whether Pillow runs the vertical pass before the horizontal one. The order changes the result (the
 * image between the passes is rounded to 8 bits) and Pillow has changed it: up to 12.1 always
 * horizontal first; 12.2 and 12.3 vertical first for images over 100 times taller than wide whose
 * height shrinks (in Image.resize); from 13.0 vertical first when the height shrinks by more than
 * twice as many pixels as the width (in Resample.c). Sizes are the whole image's, whatever the box.
 */
export function verticalFirst(inW, inH, outW, outH, pillow = PILLOW) {
  const [major, minor] = String(pillow).split(".").map(Number);
  if (major > 12) return inH - outH > 0 && inH - outH > (inW - outW) * 2;
  if (major === 12 && minor >= 2) return inH > inW * 100 && outH < inH;
  return false;
}

/** The Pillow release whose resize the clients reproduce unless told otherwise (clipmodel's environment). */
export const PILLOW = "13.0";

/**
 * Pillow's Image.resize((outW, outH), BICUBIC, box) of an RGB image: the region `box` = [x0, y0, x1, y1]
 * (input pixels, default the whole image) resampled to outW x outH in two separable passes with an
 * 8-bit image between them, in the order `verticalFirst` gives for the Pillow release `pillow`.
 */
export function resizeBicubic(image, outW, outH, box = [0, 0, image.width, image.height], pillow = PILLOW) {
  const { width: w, height: h, data } = image;
  box = box.map(Math.fround); // Pillow receives the box as C floats
  const [x0, y0, x1, y1] = box;
  if (Number.isInteger(x0) && Number.isInteger(y0) && x1 - x0 === outW && y1 - y0 === outH) {
    return crop(image, x0, y0, outW, outH); // _imaging.c's shortcut: a whole-pixel box of the output's size
  }
  const needHorizontal = outW !== w || x0 !== 0 || x1 !== outW;
  const needVertical = outH !== h || y0 !== 0 || y1 !== outH;
  const horiz = precomputeCoeffs(w, x0, x1, outW);
  const vert = precomputeCoeffs(h, y0, y1, outH);
  let pixels = data;
  if (verticalFirst(w, h, outW, outH, pillow)) {
    if (needVertical) pixels = resampleVertical(pixels, w, outH, vert, 0);
    if (needHorizontal) pixels = resampleHorizontal(pixels, w, 0, outH, outW, horiz);
  } else {
    let rowOffset = 0;
    if (needHorizontal) {
      // Only the rows the vertical pass reads.
      const first = vert.bounds[0];
      const last = vert.bounds[outH * 2 - 2] + vert.bounds[outH * 2 - 1];
      pixels = resampleHorizontal(pixels, w, first, last - first, outW, horiz);
      rowOffset = first;
    }
    if (needVertical) pixels = resampleVertical(pixels, needHorizontal ? outW : w, outH, vert, rowOffset);
  }
  return { width: outW, height: outH, data: pixels === data ? data.slice() : pixels };
}

// ---------------------------------------------------------------------------------------------
// Resize + centre crop (clipmodel.images.preprocess)

/** Python's round() of a float: halves go to the even neighbour. */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** The region [left, top, left + width, top + height) of an RGB image. */
export function crop(image, left, top, width, height = width) {
  const out = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    const from = ((top + y) * image.width + left) * 3;
    out.set(image.data.subarray(from, from + width * 3), y * width * 3);
  }
  return { width, height, data: out };
}

/**
 * RGB image -> RGB size x size: the shorter side resized to `size` (Pillow's antialiased bicubic),
 * the longer to int(size * long / short), then centre-cropped with Python's round for the offsets.
 * Strips (aspect past STRIP_RATIO) resample only the region under the crop, as Python does.
 */
export function resizeAndCrop(image, size, pillow = PILLOW) {
  const { width: w, height: h } = image;
  const short = Math.min(w, h), long = Math.max(w, h);
  const newLong = Math.trunc((size * long) / short);
  const [newW, newH] = w <= h ? [size, newLong] : [newLong, size];
  const top = roundHalfEven((newH - size) / 2), left = roundHalfEven((newW - size) / 2);
  if (newLong > STRIP_RATIO * size) {
    const sx = w / newW, sy = h / newH;
    return resizeBicubic(image, size, size, [left * sx, top * sy, (left + size) * sx, (top + size) * sy], pillow);
  }
  return crop(resizeBicubic(image, newW, newH, undefined, pillow), left, top, size);
}

/**
 * A decoded image ({width, height, data} RGBA or RGB, as stored in the file) -> uint8 RGB
 * [size, size, 3] row-major (HWC), exactly what clipmodel.images.load_image returns:
 * EXIF orientation applied, alpha composited onto `background`, resized, centre-cropped. `pillow`: the
 * Pillow release to match (see `verticalFirst`).
 */
export function preprocessImage(image, { size, background = [255, 255, 255], orientation = 1, pillow = PILLOW }) {
  if (!(image.width > 0 && image.height > 0)) throw new Error(`image has no pixels (${image.width}x${image.height})`);
  const upright = applyOrientation(image, orientation);
  return resizeAndCrop(compositeOnto(upright, background), size, pillow).data;
}
