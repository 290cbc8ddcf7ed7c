// Decoding PNG and JPEG files in Node (pngjs, jpeg-js) into what preprocess.mjs takes, with the
// EXIF orientation read from the file. Mirrors how Pillow opens these files in clipmodel/images.py.
import jpeg from "jpeg-js";
import { PNG } from "pngjs";

const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
const MAX_PIXELS = 89_478_485; // clipmodel.images.MAX_PIXELS (Pillow's own limit)

export class ImageDecodeError extends Error {}

/**
 * Encoded bytes -> {width, height, data (RGBA), orientation} with the pixels as stored (orientation
 * not yet applied; preprocess.mjs applies it). Throws ImageDecodeError for other formats or bad data.
 */
export function decodeImage(bytes) {
  if (bytes.length === 0) throw new ImageDecodeError("empty file");
  if (PNG_SIGNATURE.every((b, i) => bytes[i] === b)) return decodePng(bytes);
  if (bytes[0] === 0xff && bytes[1] === 0xd8) return decodeJpeg(bytes);
  throw new ImageDecodeError("not a PNG or JPEG file (this client decodes only those two formats)");
}

function decodeJpeg(bytes) {
  let image;
  try {
    image = jpeg.decode(bytes, { useTArray: true, formatAsRGBA: true, maxResolutionInMP: MAX_PIXELS / 1e6,
                                 maxMemoryUsageInMB: 2048 });
  } catch (e) {
    throw new ImageDecodeError(`corrupt JPEG: ${e.message}`);
  }
  return { width: image.width, height: image.height, data: image.data, orientation: jpegOrientation(bytes) };
}

function decodePng(bytes) {
  // Size from the IHDR header before any pixel is inflated: a small file can claim gigabytes.
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  if (bytes.length >= 24 && view.getUint32(16) * view.getUint32(20) > MAX_PIXELS) {
    throw new ImageDecodeError(`too many pixels: ${view.getUint32(16)}x${view.getUint32(20)} > ${MAX_PIXELS}`);
  }
  let png;
  try {
    // skipRescale keeps the file's bit depth, so samples are reduced to 8 bits the way Pillow does (below).
    png = PNG.sync.read(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length), { skipRescale: true });
  } catch (e) {
    throw new ImageDecodeError(`corrupt PNG: ${e.message}`);
  }
  const data = toEightBit(png.data, png.depth, png.colorType);
  return { width: png.width, height: png.height, data, orientation: pngOrientation(bytes) };
}

/**
 * pngjs's RGBA samples at the file's bit depth (skipRescale) -> 8 bits, as Pillow reads the file.
 * 16-bit greyscale (colour type 0, Pillow mode I;16) is divided by 257 and rounded by
 * clipmodel.images.to_rgb, which also drops its tRNS transparency; other 16-bit PNGs keep each
 * sample's high byte (Pillow's ;16B raw modes); 1, 2 and 4-bit greyscale scale to 0..255 exactly.
 * Palette images are already 8-bit RGBA.
 */
function toEightBit(data, depth, colorType) {
  if (depth === 8 || colorType === 3) return data;
  const out = new Uint8Array(data.length);
  if (depth === 16) {
    const grey = colorType === 0;
    for (let i = 0; i < data.length; i++) {
      const alpha = i % 4 === 3;
      out[i] = grey ? (alpha ? 255 : Math.round(data[i] / 257)) : data[i] >> 8;
    }
  } else {
    const factor = 255 / ((1 << depth) - 1); // 255, 85 or 17: exact
    for (let i = 0; i < data.length; i++) out[i] = data[i] * factor;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// EXIF orientation (tag 0x0112 of IFD0), from a JPEG's APP1 segment or a PNG's eXIf chunk

/** Orientation 1..8 in a TIFF-structured EXIF block, or 1 when absent or unreadable. */
export function tiffOrientation(view, start, end) {
  if (end - start < 8) return 1;
  const order = view.getUint16(start);
  if (order !== 0x4949 && order !== 0x4d4d) return 1; // "II" little-endian, "MM" big-endian
  const little = order === 0x4949;
  const ifd = start + view.getUint32(start + 4, little);
  if (ifd + 2 > end) return 1;
  const entries = view.getUint16(ifd, little);
  for (let i = 0; i < entries; i++) {
    const entry = ifd + 2 + i * 12;
    if (entry + 12 > end) break;
    if (view.getUint16(entry, little) === 0x0112) {
      const value = view.getUint16(entry + 8, little);
      return value >= 1 && value <= 8 ? value : 1;
    }
  }
  return 1;
}

/** The first APP1 "Exif" segment's orientation (Pillow keeps the first one too). */
export function jpegOrientation(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  let pos = 2;
  while (pos + 4 <= bytes.length && bytes[pos] === 0xff) {
    const marker = bytes[pos + 1];
    if (marker === 0xda || marker === 0xd9) break; // start of scan / end of image: no more metadata
    const length = view.getUint16(pos + 2);
    const body = pos + 4;
    const isExif = marker === 0xe1 && String.fromCharCode(...bytes.subarray(body, body + 6)) === "Exif\0\0";
    if (isExif) return tiffOrientation(view, body + 6, Math.min(pos + 2 + length, bytes.length));
    pos += 2 + length;
  }
  return 1;
}

/** The eXIf chunk's orientation (optionally prefixed "Exif\0\0", which Pillow also accepts). */
export function pngOrientation(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  let pos = 8;
  while (pos + 8 <= bytes.length) {
    const length = view.getUint32(pos);
    const type = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
    const body = pos + 8;
    if (type === "eXIf") {
      const end = Math.min(body + length, bytes.length);
      const prefixed = String.fromCharCode(...bytes.subarray(body, body + 6)) === "Exif\0\0";
      return tiffOrientation(view, prefixed ? body + 6 : body, end);
    }
    if (type === "IEND") break;
    pos = body + length + 4; // data, then CRC
  }
  return 1;
}
