// An exported clipmodel folder (python -m clipmodel.export) used from JavaScript: tokenizer, both
// encoders, prompt ensembling and zero-shot probabilities, as clipmodel.runtime.ClipRuntime does.
//
// Shared by the Node CLI (with onnxruntime-node) and the web page (with onnxruntime-web): the caller
// passes its onnxruntime module and a function that reads the folder's files, so nothing here needs
// Node or browser APIs. In the browser "@huggingface/tokenizers" resolves through the page's import map.
import { Tokenizer } from "@huggingface/tokenizers";

import { preprocessImage } from "./preprocess.mjs";

export const FILES = {
  image: "image_encoder.onnx",
  text: "text_encoder.onnx",
  tokenizer: "tokenizer.json",
  preprocess: "preprocess.json",
  support: "support.safetensors", // optional: the support set (clipmodel.support), listed in preprocess.json
};

// ---------------------------------------------------------------------------------------------
// Text

// Where tokenizers.js's normalizers differ from the Rust ones that wrote the training tokens:
// - Lowercase: Rust maps each character on its own; toLowerCase also applies context rules (a
//   word-final capital sigma becomes "ς" in JavaScript, "σ" in Rust).
// - Strip: Rust strips Unicode White_Space; trim() also strips U+FEFF (a byte-order mark).
const RUST_NORMALIZE = {
  Lowercase: () => (text) => Array.from(text, (ch) => ch.toLowerCase()).join(""),
  Strip: ({ strip_left: left = true, strip_right: right = true }) => (text) => {
    if (left) text = text.replace(/^\p{White_Space}+/u, "");
    if (right) text = text.replace(/\p{White_Space}+$/u, "");
    return text;
  },
};

/** Give the normalizers inside `normalizer` (a Sequence nests others) the Rust behaviour. */
function matchRustNormalizers(normalizer) {
  if (!normalizer) return;
  const rust = RUST_NORMALIZE[normalizer.config?.type];
  if (rust) normalizer.normalize = rust(normalizer.config);
  for (const inner of normalizer.normalizers ?? []) matchRustNormalizers(inner);
}

/**
 * Caption -> token ids as clipmodel's tokenizer encodes them: normalised, byte-level BPE, the ids cut
 * to contextLength - 2, then SOT first, EOT last and pad ids up to contextLength.
 */
export class CaptionTokenizer {
  /** tokenizerJson: tokenizer.json parsed; pre: preprocess.json parsed. */
  constructor(tokenizerJson, pre) {
    // Special tokens are text like any other (Python's encode_special_tokens = True): a caption that
    // contains "<end_of_text>" must not end early. Truncation, padding and the SOT/EOT template are
    // applied below, so the file's own settings for them are dropped.
    const json = { ...tokenizerJson, truncation: null, padding: null,
                   added_tokens: (tokenizerJson.added_tokens ?? []).filter((t) => !t.special) };
    this.tokenizer = new Tokenizer(json, {});
    matchRustNormalizers(this.tokenizer.normalizer);
    this.contextLength = pre.context_length;
    this.pad = pre.pad_id;
    this.sot = pre.sot_id;
    this.eot = pre.eot_id;
  }

  /** The BPE ids of one caption, without special tokens or truncation. */
  bpe(text) {
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /** One caption -> number[contextLength]; whether it was truncated is `ids.truncated`. */
  encode(text) {
    const bpe = this.bpe(text);
    const kept = bpe.slice(0, this.contextLength - 2); // EOT is always kept, as the last real token
    const ids = [this.sot, ...kept, this.eot];
    while (ids.length < this.contextLength) ids.push(this.pad);
    ids.truncated = bpe.length > kept.length;
    return ids;
  }

  /**
   * Captions -> {data: BigInt64Array [N * length], length}, row-major: the text encoder's `tokens`.
   * Rows are padded to contextLength, or with `trim` only as far as the longest caption needs: exact
   * for the causal text tower, and cheaper, where the graph's sequence axis is symbolic.
   */
  encodeBatch(texts, trim = false) {
    const rows = texts.map((text) => this.encode(text));
    const used = (ids) => ids.lastIndexOf(this.eot) + 1;
    const length = trim ? Math.max(1, ...rows.map(used)) : this.contextLength;
    const data = new BigInt64Array(texts.length * length);
    rows.forEach((ids, i) => data.set(ids.slice(0, length).map(BigInt), i * length));
    return { data, length };
  }
}

// ---------------------------------------------------------------------------------------------
// Vectors

/** The vector scaled to unit length (zero stays zero, as numpy's x / max(|x|, 1e-12)). */
export function unit(vector) {
  let norm = 0;
  for (const v of vector) norm += v * v;
  norm = Math.max(Math.sqrt(norm), 1e-12);
  return Float32Array.from(vector, (v) => v / norm);
}

export function dot(a, b) {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

/** softmax(scale * x) over one row, computed stably (a loop: a bank's rows are too many to spread). */
export function softmax(values, scale = 1) {
  let max = -Infinity;
  for (const v of values) max = Math.max(max, v * scale);
  const exps = values.map((v) => Math.exp(v * scale - max));
  const sum = exps.reduce((a, b) => a + b, 0);
  return exps.map((e) => e / sum);
}

/** Rows of a flat Float32Array [N * D] as N Float32Array views of length D. */
function rows(flat, dim) {
  return Array.from({ length: flat.length / dim }, (_, i) => flat.subarray(i * dim, (i + 1) * dim));
}

// ---------------------------------------------------------------------------------------------
// Support set

/**
 * A safetensors file (8-byte little-endian header length, JSON header, raw little-endian data) ->
 * {tensors: {name: {shape, data}}, metadata}; F32 gives a Float32Array, I64 a BigInt64Array.
 */
export function readSafetensors(bytes, name = "safetensors") {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = bytes.length >= 8 ? Number(view.getBigUint64(0, true)) : Infinity;
  if (8 + headerLength > bytes.length) throw new Error(`${name}: not a safetensors file (too short)`);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength)));
  const types = { F32: Float32Array, I64: BigInt64Array };
  const tensors = {};
  for (const [key, { dtype, shape, data_offsets: [begin, end] = [] }] of Object.entries(header)) {
    if (key === "__metadata__") continue;
    const Type = types[dtype];
    const count = shape.reduce((a, b) => a * b, 1);
    if (!Type || end - begin !== count * Type.BYTES_PER_ELEMENT || 8 + headerLength + end > bytes.length) {
      throw new Error(`${name}: tensor ${key} (${dtype} ${JSON.stringify(shape)}) cannot be read`);
    }
    // A copy: typed arrays need offsets aligned to their element size, which the format does not promise.
    const start = 8 + headerLength + begin;
    tensors[key] = { shape, data: new Type(bytes.slice(start, start + end - begin).buffer) };
  }
  return { tensors, metadata: header.__metadata__ ?? {} };
}

/**
 * Support-set zero-shot (clipmodel.support): the training images and captions the model embedded.
 * A unit class vector t becomes t + weight * s, not renormalised, where s is the unit sum over captions
 * k of softmax_k(t . captions[k] / temperature) * images[captionImage[k]]; weight 0 is plain zero-shot.
 */
export class SupportSet {
  constructor(images, captions, captionImage, weight, temperature) {
    Object.assign(this, { images, captions, captionImage, weight, temperature });
  }

  /** support.safetensors's bytes -> SupportSet; throws naming the file when it is not a bank of dim-d rows. */
  static fromBytes(bytes, dim, name = FILES.support) {
    const { tensors, metadata } = readSafetensors(bytes, name);
    const { images, captions, caption_image: captionImage } = tensors;
    const weight = Number(metadata.weight), temperature = Number(metadata.temperature);
    if (!images || !captions || !captionImage || images.shape[1] !== dim || captions.shape[1] !== dim ||
        captionImage.shape[0] !== captions.shape[0] || !(weight >= 0) || !(temperature > 0)) {
      throw new Error(`${name}: not a support set of ${dim}-d embeddings`);
    }
    const imageRows = rows(images.data, dim);
    const index = Array.from(captionImage.data, Number);
    if (index.some((i) => !(i >= 0 && i < imageRows.length))) throw new Error(`${name}: caption_image out of range`);
    return new SupportSet(imageRows, rows(captions.data, dim), index, weight, temperature);
  }

  withWeight(weight) {
    return new SupportSet(this.images, this.captions, this.captionImage, weight, this.temperature);
  }

  /** Unit class vector Float32Array [D] -> Float32Array [D]: t + weight * s. */
  apply(t) {
    if (this.weight === 0) return t;
    const w = softmax(this.captions.map((c) => dot(t, c)), 1 / this.temperature);
    const s = new Float64Array(t.length);
    w.forEach((wk, k) => {
      const image = this.images[this.captionImage[k]];
      for (let d = 0; d < s.length; d++) s[d] += wk * image[d];
    });
    const su = unit(s);
    return Float32Array.from(t, (v, d) => v + this.weight * su[d]);
  }
}

// ---------------------------------------------------------------------------------------------
// Model

export class ClipModel {
  /**
   * ort: onnxruntime-node or onnxruntime-web; readFile(name) -> Promise<Uint8Array> of a file of the
   * exported folder; sessionOptions go to both InferenceSession.create calls. The folder's support set,
   * where preprocess.json lists one, joins every class vector (`model.support = null`: plain zero-shot).
   * At weight 0 it changes nothing, so it is read only with `reweight` (a caller that will set its
   * own weight): a browser would otherwise fetch it (29 MB for the default model) for nothing.
   */
  static async load(ort, readFile, sessionOptions = {}, reweight = false) {
    const decoder = new TextDecoder();
    const readJson = async (name) => JSON.parse(decoder.decode(await readFile(name)));
    const [pre, tokenizerJson] = await Promise.all([readJson(FILES.preprocess), readJson(FILES.tokenizer)]);
    // One after the other: two sessions initialising at once double the peak memory.
    const image = await ort.InferenceSession.create(await readFile(FILES.image), sessionOptions);
    const text = await ort.InferenceSession.create(await readFile(FILES.text), sessionOptions);
    const support = pre.support && (pre.support.weight > 0 || reweight)
      ? SupportSet.fromBytes(await readFile(pre.support.file), pre.embed_dim) : null;
    return new ClipModel(ort, image, text, new CaptionTokenizer(tokenizerJson, pre), pre, support);
  }

  constructor(ort, imageSession, textSession, tokenizer, pre, support = null) {
    this.ort = ort;
    this.imageSession = imageSession;
    this.textSession = textSession;
    this.tokenizer = tokenizer;
    this.pre = pre;
    this.support = support;
    this.size = pre.image_size;
    this.dim = pre.embed_dim;
    this.logitScale = pre.logit_scale;
    this.templates = pre.templates?.length ? pre.templates : ["{}"]; // clipmodel.templates.DEFAULT_TEMPLATES
    // Folders from before the sequence axis became symbolic take exactly context_length tokens.
    const tokensShape = textSession.inputMetadata?.[0]?.shape;
    this.trimTokens = Array.isArray(tokensShape) && typeof tokensShape[1] !== "number";
  }

  /** A decoded image {width, height, data RGBA or RGB, orientation?} -> uint8 RGB [S, S, 3]. */
  preprocess(image) {
    return preprocessImage(image, { size: this.size, background: this.pre.background ?? [255, 255, 255],
                                    orientation: image.orientation ?? 1 });
  }

  /** Preprocessed images (uint8 [S, S, 3] each) -> Float32Array[] unit embeddings. */
  async embedPixels(pixelsList, batchSize = 16) {
    const out = [];
    for (let start = 0; start < pixelsList.length; start += batchSize) {
      const batch = pixelsList.slice(start, start + batchSize);
      const feeds = { [this.imageSession.inputNames[0]]: this.imageTensor(batch) };
      const result = await this.imageSession.run(feeds);
      out.push(...rows(result.embedding.data, this.dim));
    }
    return out;
  }

  /**
   * The image encoder's input `pixels`: float32 [N, 3, S, S], normalised with preprocess.json's mean
   * and std in the same float32 steps as the Python runtime.
   */
  imageTensor(batch) {
    const s = this.size, n = batch.length, plane = s * s;
    const { mean, std } = this.pre;
    const data = new Float32Array(n * 3 * plane);
    batch.forEach((pixels, i) => {
      for (let p = 0; p < plane; p++) {
        for (let c = 0; c < 3; c++) {
          // Same float32 steps as numpy: x / 255, minus mean, over std.
          const x = Math.fround(pixels[p * 3 + c] / 255);
          data[(i * 3 + c) * plane + p] = Math.fround(Math.fround(x - Math.fround(mean[c])) / Math.fround(std[c]));
        }
      }
    });
    return new this.ort.Tensor("float32", data, [n, 3, s, s]);
  }

  /** Decoded images -> Float32Array[] unit embeddings. */
  async encodeImages(images, batchSize = 16) {
    return this.embedPixels(images.map((image) => this.preprocess(image)), batchSize);
  }

  /** Captions -> Float32Array[] unit embeddings (over-long captions truncated, EOT kept). */
  async encodeTexts(texts, batchSize = 64) {
    const out = [];
    for (let start = 0; start < texts.length; start += batchSize) {
      const batch = texts.slice(start, start + batchSize);
      const { data, length } = this.tokenizer.encodeBatch(batch, this.trimTokens);
      const tokens = new this.ort.Tensor("int64", data, [batch.length, length]);
      const result = await this.textSession.run({ [this.textSession.inputNames[0]]: tokens });
      out.push(...rows(result.embedding.data, this.dim));
    }
    return out;
  }

  /**
   * One unit vector per label: the label's prompts (each template with "{}" replaced by it) embedded,
   * each normalised, averaged and renormalised (clipmodel.zeroshot.class_vectors), with the support
   * set's term added when there is one (ClipRuntime.class_embeddings).
   */
  async classEmbeddings(labels, templates = this.templates) {
    // A replacer function, so that "$&" or "$1" in a label stays literal.
    const prompts = labels.flatMap((label) => templates.map((t) => t.replace("{}", () => label)));
    const embeddings = await this.encodeTexts(prompts);
    return labels.map((_, i) => {
      const mean = new Float32Array(this.dim);
      for (const e of embeddings.slice(i * templates.length, (i + 1) * templates.length)) {
        const u = unit(e);
        for (let d = 0; d < this.dim; d++) mean[d] += u[d] / templates.length;
      }
      return this.support ? this.support.apply(unit(mean)) : unit(mean);
    });
  }

  /**
   * Per image embedding, every label with its probability, most probable first:
   * softmax(logit_scale * score) over the labels (clipmodel.zeroshot.classify), the score being the image's
   * cosine with the class vector plus, with a support set, its support term.
   */
  scoreLabels(imageEmbeddings, classEmbeddings, labels) {
    return imageEmbeddings.map((embedding) => {
      const image = unit(embedding);
      const scores = classEmbeddings.map((c) => dot(image, c));
      const probs = softmax(scores, this.logitScale);
      return labels.map((label, i) => ({ label, prob: probs[i], score: scores[i] }))
        .sort((a, b) => b.prob - a.prob);
    });
  }
}
