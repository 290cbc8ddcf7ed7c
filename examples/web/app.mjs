// The page's logic: load an exported model folder with onnxruntime-web (wasm backend), then zero-shot
// classification of one image and text search over a chosen folder, all in the browser.
// Preprocessing, tokenisation and scoring are the Node client's own modules (examples/node/).
import * as ort from "onnxruntime-web/wasm";

import { ClipModel, dot } from "../node/clip-core.mjs";

const $ = (selector) => document.querySelector(selector);

// onnxruntime-web fetches its .wasm next to its scripts in node_modules. Threads need a
// cross-origin-isolated page (serve.py sends the headers); otherwise one thread.
ort.env.wasm.wasmPaths = new URL("./node_modules/onnxruntime-web/dist/", import.meta.url).href;
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
const SESSION_OPTIONS = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };

const state = { model: null, image: null, index: [] };
// For tests and the curious: the last classification's pixels, embedding and scores.
window.clipDemo = state;

// ---------------------------------------------------------------------------------------------
// Model

function setStatus(element, text, dataState) {
  element.textContent = text;
  element.dataset.state = dataState;
}

async function loadModel(readFile, where) {
  setStatus($("#model-status"), `Loading the model from ${where}…`, "loading");
  try {
    state.model = await ClipModel.load(ort, readFile, SESSION_OPTIONS);
  } catch (e) {
    setStatus($("#model-status"), `Could not load the model from ${where}: ${e.message ?? e}`, "error");
    return;
  }
  const { model } = state;
  $("#templates").value = model.templates.join("\n");
  $("#preview").width = $("#preview").height = model.size;
  setStatus($("#model-status"), `Model from ${where}: ${model.size}×${model.size} pixels, ` +
            `${model.dim}-d embeddings, ${ort.env.wasm.numThreads} thread(s)` +
            (model.support ? `, support set of ${model.support.images.length} images at weight ${model.support.weight}.`
                           : "."), "ready");
  $("#classify").disabled = false;
  state.index = []; // another model's embeddings mean nothing to this one
  $("#search").disabled = true;
  if (state.image) await classify();
  if ($("#folder-input").files.length) await indexFolder($("#folder-input").files);
}

/** Files of the folder at `base` (a URL), fetched from the server that serves this page. */
function urlReader(base) {
  return async (name) => {
    const response = await fetch(new URL(name, base));
    if (!response.ok) throw new Error(`${name}: HTTP ${response.status}`);
    return new Uint8Array(await response.arrayBuffer());
  };
}

/** Files of a folder the user picked (webkitdirectory input), by their base name. */
function pickedReader(files) {
  const byName = new Map([...files].map((file) => [file.name, file]));
  return async (name) => {
    const file = byName.get(name);
    if (!file) throw new Error(`the chosen folder has no ${name}`);
    return new Uint8Array(await file.arrayBuffer());
  };
}

// ---------------------------------------------------------------------------------------------
// Decoding: the browser decodes, orientation from EXIF, no colour management, alpha not premultiplied

async function decode(blob) {
  const bitmap = await createImageBitmap(blob, {
    imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none",
  });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  const { width, height, data } = context.getImageData(0, 0, canvas.width, canvas.height);
  return { width, height, data, orientation: 1 }; // already upright
}

/** Draw uint8 RGB [S, S, 3] pixels on a canvas of size S. */
function showPixels(canvas, rgb, size) {
  const rgba = new ImageData(size, size);
  for (let i = 0, o = 0; i < rgb.length; i += 3, o += 4) {
    rgba.data.set(rgb.subarray(i, i + 3), o);
    rgba.data[o + 3] = 255;
  }
  canvas.getContext("2d").putImageData(rgba, 0, 0);
}

// ---------------------------------------------------------------------------------------------
// Zero-shot classification

const lines = (text) => text.split("\n").map((line) => line.trim()).filter(Boolean);

async function chooseImage(file) {
  try {
    state.image = await decode(file);
  } catch (e) {
    $("#results").dataset.state = "error";
    $("#image-info").textContent = `${file.name}: this browser cannot decode it (${e.message ?? e})`;
    return;
  }
  $("#image-info").textContent = `${file.name}: ${state.image.width}×${state.image.height} pixels`;
  if (state.model) await classify();
}

async function classify() {
  try {
    await classifyImage();
  } catch (e) {
    $("#image-info").textContent = `Classification failed: ${e.message ?? e}`;
    $("#results").dataset.state = "error";
  }
}

async function classifyImage() {
  const { model, image } = state;
  const labels = lines($("#labels").value);
  const templates = lines($("#templates").value);
  if (!model || !image || !labels.length) return;
  const bad = templates.filter((t) => t.split("{}").length !== 2);
  if (bad.length) {
    $("#image-info").textContent = `Every template needs exactly one {} (not: ${bad.join(", ")})`;
    return;
  }
  $("#results").dataset.state = "running";
  const pixels = model.preprocess(image);
  showPixels($("#preview"), pixels, model.size);
  const [embedding] = await model.embedPixels([pixels]);
  const classes = await model.classEmbeddings(labels, templates.length ? templates : model.templates);
  const [scores] = model.scoreLabels([embedding], classes, labels);
  Object.assign(state, { pixels, embedding, scores });
  renderScores(scores);
}

function renderScores(scores) {
  const body = $("#results tbody");
  body.replaceChildren(...scores.map(({ label, prob }) => {
    const row = document.createElement("tr");
    const bar = document.createElement("div");
    bar.className = "fill";
    bar.style.width = `${(prob * 100).toFixed(1)}%`;
    row.append(cell(label), cell(`${(prob * 100).toFixed(1)} %`), cell(bar, "bar"));
    return row;
  }));
  $("#results").dataset.top = scores[0].label;
  $("#results").dataset.state = "done";
}

function cell(content, className) {
  const td = document.createElement("td");
  td.append(content);
  if (className) td.className = className;
  return td;
}

// ---------------------------------------------------------------------------------------------
// Search a folder by text

async function indexFolder(files) {
  const { model } = state;
  const images = [...files].filter((f) => f.type.startsWith("image/"))
    .sort((a, b) => (a.webkitRelativePath || a.name).localeCompare(b.webkitRelativePath || b.name));
  state.index = [];
  const skipped = [];
  for (const [i, file] of images.entries()) {
    setStatus($("#index-status"), `Embedding ${i + 1} of ${images.length}…`, "running");
    try {
      const [embedding] = await model.encodeImages([await decode(file)]);
      state.index.push({ file, embedding });
    } catch (e) {
      skipped.push(file.name);
    }
  }
  const note = skipped.length ? ` (${skipped.length} could not be decoded: ${skipped.join(", ")})` : "";
  setStatus($("#index-status"), `${state.index.length} image(s) indexed${note}.`, "ready");
  $("#search").disabled = state.index.length === 0;
}

async function search(query) {
  const [text] = await state.model.encodeTexts([query]);
  const hits = state.index.map(({ file, embedding }) => ({ file, score: dot(embedding, text) }))
    .sort((a, b) => b.score - a.score).slice(0, 12);
  $("#hits").replaceChildren(...hits.map(({ file, score }) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = URL.createObjectURL(file);
    const caption = document.createElement("figcaption");
    caption.textContent = `${score.toFixed(3)} ${file.webkitRelativePath || file.name}`;
    figure.append(img, caption);
    return figure;
  }));
  $("#hits").dataset.state = "done";
  state.hits = hits.map(({ file, score }) => ({ name: file.webkitRelativePath || file.name, score }));
}

// ---------------------------------------------------------------------------------------------
// Wiring

function wire() {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      document.querySelectorAll(".tab, .panel").forEach((el) => el.classList.remove("active"));
      tab.classList.add("active");
      $(`#${tab.dataset.tab}`).classList.add("active");
    });
  }
  const drop = $("#drop-zone");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) chooseImage(e.dataTransfer.files[0]);
  });
  $("#image-input").addEventListener("change", (e) => e.target.files.length && chooseImage(e.target.files[0]));
  $("#classify").addEventListener("click", () => classify());
  $("#model-input").addEventListener("change", (e) => {
    if (e.target.files.length) loadModel(pickedReader(e.target.files), "the chosen folder");
  });
  $("#folder-input").addEventListener("change", (e) => state.model && indexFolder(e.target.files));
  $("#search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (state.model && state.index.length && $("#query").value.trim()) search($("#query").value);
  });
}

wire();
// The model folder: ?model=URL, by default /model/ (where serve.py puts it).
const modelUrl = new URL(new URLSearchParams(location.search).get("model") ?? "/model/", location.href);
loadModel(urlReader(modelUrl), modelUrl.pathname);
