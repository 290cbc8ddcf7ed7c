#!/usr/bin/env node
// Command-line client for an exported clipmodel folder; prints JSON on stdout.
//
//   node clip.mjs embed    --model DIR [--images A.png B.jpg ...] [--texts "a caption" ...]
//   node clip.mjs classify --model DIR --labels cat dog [--templates "a photo of a {}." ...] [--top K]
//                          [--support-weight W] -- IMAGE...
//   node clip.mjs tokens   --model DIR --texts "a caption" ...                   (token ids only)
//   node clip.mjs pixels   --size S [--background R,G,B] [--out DIR] IMAGE...   (preprocessed pixels only)
//
// A list option takes every value up to the next --option; "--" ends it, and whatever is not an
// option's value is an image.
import "./no-telemetry.mjs";  // first: before onnxruntime-node starts
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import * as ort from "onnxruntime-node";

import { CaptionTokenizer, ClipModel, FILES } from "./clip-core.mjs";
import { decodeImage } from "./decode.mjs";
import { preprocessImage } from "./preprocess.mjs";

const LIST_OPTIONS = new Set(["images", "texts", "labels", "templates"]);
const VALUE_OPTIONS = new Set(["model", "top", "threads", "size", "background", "out", "support-weight"]);
const USAGE = `usage:
  clip.mjs embed    --model DIR [--images IMAGE...] [--texts TEXT...]
  clip.mjs classify --model DIR --labels LABEL... [--templates T...] [--top K] [--support-weight W] [--] IMAGE...
  clip.mjs tokens   --model DIR --texts TEXT...
  clip.mjs pixels   --size S [--background R,G,B] [--out DIR] IMAGE...`;

class UsageError extends Error {}

/** argv -> {command, options, positionals}; list options collect values up to the next option. */
function parseArgs(argv) {
  const [command, ...rest] = argv;
  const options = {}, positionals = [];
  let list = null;
  for (let i = 0; i < rest.length; i++) {
    const arg = rest[i];
    if (arg === "--") { list = null; continue; }
    if (arg.startsWith("--")) {
      const name = arg.slice(2);
      if (LIST_OPTIONS.has(name)) { list = options[name] ??= []; continue; }
      if (!VALUE_OPTIONS.has(name)) throw new UsageError(`unknown option ${arg}`);
      if (i + 1 >= rest.length) throw new UsageError(`${arg} needs a value`);
      options[name] = rest[++i];
      list = null;
      continue;
    }
    (list ?? positionals).push(arg);
  }
  return { command, options, positionals };
}

/** Decoded image from a file; errors name the file. */
function readImage(file) {
  try {
    return decodeImage(fs.readFileSync(file));
  } catch (e) {
    throw new Error(`${file}: ${e.code === "ENOENT" ? "no such file" : e.message}`);
  }
}

async function loadModel(options) {
  if (!options.model) throw new UsageError("--model DIR is required (a folder written by python -m clipmodel.export)");
  const dir = options.model;
  const threads = Number(options.threads ?? Math.min(os.availableParallelism(), 4));
  const sessionOptions = { executionProviders: ["cpu"], intraOpNumThreads: threads, interOpNumThreads: 1,
                           graphOptimizationLevel: "all", executionMode: "sequential" };
  const readFile = async (name) => {
    const file = path.join(dir, name);
    if (!fs.existsSync(file)) throw new Error(`${dir} is not an exported model folder (missing ${name})`);
    return new Uint8Array(fs.readFileSync(file));
  };
  return ClipModel.load(ort, readFile, sessionOptions, options["support-weight"] !== undefined);
}

const toList = (embedding) => Array.from(embedding);

async function embed({ options, positionals }) {
  const model = await loadModel(options);
  const images = [...(options.images ?? []), ...positionals];
  const texts = options.texts ?? [];
  if (!images.length && !texts.length) throw new UsageError("embed needs --images and/or --texts");
  const imageEmbeddings = await model.encodeImages(images.map(readImage));
  const textEmbeddings = await model.encodeTexts(texts);
  return {
    images: images.map((file, i) => ({ path: file, embedding: toList(imageEmbeddings[i]) })),
    texts: texts.map((text, i) => ({ text, embedding: toList(textEmbeddings[i]),
                                     truncated: model.tokenizer.encode(text).truncated })),
  };
}

async function classify({ options, positionals }) {
  const labels = options.labels ?? [];
  const images = [...(options.images ?? []), ...positionals];
  if (!labels.length) throw new UsageError("classify needs --labels");
  if (labels.length === 1 && labels[0].includes(",")) {
    // clipmodel's CLIs split --labels at commas; here each label is its own argument (names may hold commas).
    console.error(`clip.mjs: one label, "${labels[0]}": labels are separate arguments (--labels cat dog)`);
  }
  if (!images.length) throw new UsageError("classify needs images");
  const model = await loadModel(options);
  const templates = options.templates ?? model.templates;
  const bad = templates.filter((t) => t.split("{}").length !== 2);
  if (bad.length) throw new UsageError(`every template needs exactly one "{}" (bad: ${bad.join(", ")})`);
  const top = Number(options.top ?? 5);
  if (options["support-weight"] !== undefined) {
    // As clipmodel's CLIs: the folder's support set at another weight; 0 is the paper's zero-shot.
    const weight = Number(options["support-weight"]);
    if (!Number.isFinite(weight) || weight < 0) {
      throw new UsageError(`--support-weight must be a finite number >= 0, not ${options["support-weight"]}`);
    }
    if (weight > 0 && !model.support) {
      throw new UsageError(`--support-weight: ${options.model} has no ${FILES.support} (the evaluate stage writes ` +
                           "it beside the model; export copies it into the ONNX folder)");
    }
    model.support = weight > 0 ? model.support.withWeight(weight) : null;
  }
  const classes = await model.classEmbeddings(labels, templates);
  const scores = model.scoreLabels(await model.encodeImages(images.map(readImage)), classes, labels);
  return images.map((file, i) => ({ path: file, top: scores[i].slice(0, top) }));
}

/** Token ids only (no encoder run): the text encoder's input rows, for checking the tokenizer. */
async function tokens({ options }) {
  if (!options.model) throw new UsageError("--model DIR is required");
  const read = (name) => JSON.parse(fs.readFileSync(path.join(options.model, name), "utf8"));
  const tokenizer = new CaptionTokenizer(read(FILES.tokenizer), read(FILES.preprocess));
  return (options.texts ?? []).map((text) => {
    const ids = tokenizer.encode(text);
    return { text, ids: [...ids], truncated: ids.truncated };
  });
}

/** Preprocessed pixels only (no model): raw RGB files, for checking against clipmodel.images.load_image. */
function pixels({ options, positionals }) {
  const size = Number(options.size);
  if (!(size > 0)) throw new UsageError("pixels needs --size S");
  const background = (options.background ?? "255,255,255").split(",").map(Number);
  const out = options.out ?? ".";
  fs.mkdirSync(out, { recursive: true });
  return positionals.map((file, i) => {
    const image = readImage(file);
    const started = performance.now();
    const rgb = preprocessImage(image, { size, background, orientation: image.orientation });
    const ms = performance.now() - started;
    const target = path.join(out, `${i}.rgb`);
    fs.writeFileSync(target, rgb);
    return { path: file, width: image.width, height: image.height, orientation: image.orientation,
             out: target, ms: Math.round(ms * 10) / 10 };
  });
}

const COMMANDS = { embed, classify, tokens, pixels };

async function main(argv) {
  try {
    const args = parseArgs(argv);
    const run = COMMANDS[args.command];
    if (!run) throw new UsageError(args.command ? `unknown command ${args.command}` : "no command");
    process.stdout.write(JSON.stringify(await run(args)) + "\n");
  } catch (e) {
    process.stderr.write(`clip.mjs: ${e.message}\n`);
    if (e instanceof UsageError) process.stderr.write(`${USAGE}\n`);
    process.exitCode = e instanceof UsageError ? 2 : 1;
  }
}

await main(process.argv.slice(2));
