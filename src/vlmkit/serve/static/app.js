// vlmkit's page: plain JavaScript over the JSON API (no build step, no dependencies).
//
// On load it reads GET /v1/models and shows each panel (<section data-endpoint>) only when some
// loaded model serves that endpoint; the panel's model menu lists exactly those models. Images go to
// the API as data: URLs (base64), server text is put on the page with textContent only (never as
// HTML), and every error shows the server's one-sentence message in the panel that asked.
"use strict";

const state = { image: null, models: [], indexes: [], chat: [] };
const $ = (selector, root = document) => root.querySelector(selector);

function apiKey() {
  return $("#api-key").value.trim();
}

function headers(json) {
  const out = json ? { "content-type": "application/json" } : {};
  if (apiKey()) out.authorization = "Bearer " + apiKey();
  return out;
}

// POST (with a body) or GET `path`; resolves to the JSON answer, rejects with the server's message.
async function api(path, body) {
  const response = await fetch(path, body === undefined
    ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  return readJson(response);
}

async function readJson(response) {
  let data = null;
  try { data = await response.json(); } catch (error) { /* not JSON: reported below */ }
  if (!response.ok) {
    const message = data && data.error && data.error.message ? data.error.message : `the server answered ${response.status}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return data;
}

// Run `work` for one panel: busy while it runs, its error shown in the panel, data-state for tests.
async function inPanel(panel, work) {
  const error = $(".error", panel);
  error.textContent = "";
  panel.dataset.state = "busy";
  panel.querySelectorAll("button").forEach((button) => { button.dataset.wasDisabled = button.disabled; button.disabled = true; });
  try {
    await work();
    panel.dataset.state = "done";
  } catch (failure) {
    error.textContent = failure.message;
    panel.dataset.state = "error";
  } finally {
    panel.querySelectorAll("button").forEach((button) => { button.disabled = button.dataset.wasDisabled === "true"; });
    refreshImageButtons();
  }
}

function chosenModel(panel) {
  const select = $(".model-select", panel);
  return select && select.value ? select.value : undefined;
}

function needImage() {
  if (!state.image) throw new Error("pick or drop an image first");
  return state.image;
}

function refreshImageButtons() {
  document.querySelectorAll("[data-needs-image]").forEach((button) => {
    if (button.closest(".panel").dataset.state !== "busy") button.disabled = !state.image;
  });
}

// ---- loading: which panels, which models -------------------------------------------------------

async function loadModels() {
  const status = $("#status");
  document.body.dataset.ready = "loading";
  try {
    const listing = await api("/v1/models");
    state.models = listing.models || [];
    state.indexes = listing.indexes || [];
  } catch (failure) {
    if (failure.status === 401) {
      $("#key-box").hidden = false;
      status.textContent = "This server needs an API key: enter it above and press Enter.";
    } else {
      status.textContent = "Cannot list the models: " + failure.message;
    }
    document.body.dataset.ready = "error";
    return;
  }
  const names = state.models.map((model) => `${model.name} (${(model.capability_names || []).join(", ") || "no capabilities"})`);
  status.textContent = state.models.length
    ? `${state.models.length} model${state.models.length > 1 ? "s" : ""}: ${names.join(" · ")}` +
      (state.indexes.length ? ` · index${state.indexes.length > 1 ? "es" : ""}: ${state.indexes.map((i) => i.name).join(", ")}` : "")
    : "No model is loaded.";
  document.querySelectorAll("section[data-endpoint]").forEach((panel) => {
    const serving = state.models.filter((model) => (model.endpoints || []).includes(panel.dataset.endpoint));
    panel.hidden = serving.length === 0;
    const select = $(".model-select", panel);
    if (select) fillSelect(select, serving.map((model) => model.name));
  });
  fillSelect($("#search-index"), state.indexes.map((index) => index.name));
  const imageEndpoints = ["/v1/classify", "/v1/search", "/v1/caption", "/v1/ask", "/v1/chat"];
  $("#panel-image").hidden = !state.models.some((model) => imageEndpoints.some((e) => (model.endpoints || []).includes(e)));
  refreshImageButtons();
  document.body.dataset.ready = "true";
}

function fillSelect(select, names) {
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  select.hidden = names.length < 2;  // one choice: nothing to choose
}

// ---- the image -------------------------------------------------------------------------------

function useFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    $("#image-name").textContent = `${file.name} is not an image`;
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;  // a data: URL, which the API accepts as it is
    const preview = $("#preview");
    preview.src = state.image;
    preview.hidden = false;
    $("#drop-hint").hidden = true;
    $("#image-name").textContent = file.name;
    refreshImageButtons();
  };
  reader.readAsDataURL(file);
}

function setUpImage() {
  const zone = $("#drop-zone");
  $("#image-input").addEventListener("change", (event) => useFile(event.target.files[0]));
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    useFile(event.dataTransfer.files[0]);
  });
  zone.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("#image-input").click(); });
}

// ---- panels ------------------------------------------------------------------------------------

function labels() {
  return $("#classify-labels").value.split(/[,\n]/).map((label) => label.trim()).filter(Boolean);
}

async function classify() {
  const panel = $("#panel-classify");
  await inPanel(panel, async () => {
    $("#classify-bars").replaceChildren();
    const wanted = labels();
    if (!wanted.length) throw new Error("type at least one label");
    const answer = await api("/v1/classify", { model: chosenModel(panel), image: needImage(), labels: wanted });
    $("#classify-bars").replaceChildren(...answer.labels.map(bar));
  });
}

function bar({ label, probability }) {
  const row = document.createElement("div");
  row.className = "bar";
  row.dataset.label = label;
  row.dataset.probability = String(probability);
  const name = document.createElement("span");
  name.className = "bar-label";
  name.textContent = label;
  name.title = label;
  const track = document.createElement("div");
  track.className = "bar-track";
  const fill = document.createElement("div");
  fill.className = "bar-fill";
  fill.style.width = `${(100 * probability).toFixed(1)}%`;
  track.append(fill);
  const value = document.createElement("span");
  value.className = "bar-value";
  value.textContent = `${(100 * probability).toFixed(1)}%`;
  row.append(name, track, value);
  return row;
}

async function search(query) {
  const panel = $("#panel-search");
  await inPanel(panel, async () => {
    $("#search-hits").replaceChildren();
    const body = { k: Number($("#search-k").value), ...query };
    if ($("#search-index").value) body.index = $("#search-index").value;
    const answer = await api("/v1/search", body);
    const hits = answer.hits.map(hitFigure);
    $("#search-hits").replaceChildren(...hits.map(({ figure }) => figure));
    await Promise.all(hits.map(({ loaded }) => loaded));
  });
}

// A thumbnail is fetched (not <img src>) so the API key header goes with it when one is set.
function hitFigure(hit) {
  const figure = document.createElement("figure");
  figure.className = "hit";
  figure.dataset.row = String(hit.row);
  figure.dataset.score = String(hit.score);
  const image = document.createElement("img");
  image.alt = `row ${hit.row}`;
  const caption = document.createElement("figcaption");
  const record = hit.record || {};
  caption.textContent = record.text || (record.texts && record.texts[0]) || record.label || `row ${hit.row}`;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = `score ${hit.score.toFixed(3)}`;
  figure.append(image, caption, score);
  let loaded = Promise.resolve();
  if (hit.image_url) {
    loaded = fetch(hit.image_url, { headers: headers(false) })
      .then((response) => (response.ok ? response.blob() : Promise.reject(new Error("no image"))))
      .then((blob) => new Promise((resolve) => {
        image.onload = resolve;
        image.onerror = resolve;
        image.src = URL.createObjectURL(blob);
      }))
      .catch(() => { image.alt = `row ${hit.row}: image unavailable`; });
  }
  return { figure, loaded };
}

async function caption() {
  const panel = $("#panel-caption");
  await inPanel(panel, async () => {
    $("#caption-output").textContent = "";
    const answer = await api("/v1/caption", { model: chosenModel(panel), image: needImage() });
    $("#caption-output").textContent = answer.caption;
  });
}

async function ask() {
  const panel = $("#panel-ask");
  await inPanel(panel, async () => {
    $("#ask-output").textContent = "";
    const question = $("#ask-question").value.trim();
    if (!question) throw new Error("type a question");
    const answer = await api("/v1/ask", { model: chosenModel(panel), image: needImage(), question });
    $("#ask-output").textContent = answer.answer;
  });
}

function chatBubble(role, text) {
  const bubble = document.createElement("div");
  bubble.className = `message ${role}`;
  bubble.textContent = text;
  $("#chat-log").append(bubble);
  $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
  return bubble;
}

// The reply streams as server-sent events over a POST (EventSource can only GET): read the body.
async function chat() {
  const panel = $("#panel-chat");
  const input = $("#chat-input");
  const text = input.value.trim();
  if (!text) return;
  await inPanel(panel, async () => {
    const messages = [...state.chat, { role: "user", content: text }];
    chatBubble("user", text);
    input.value = "";
    const bubble = chatBubble("assistant", "");
    const body = { model: chosenModel(panel), messages, stream: true };
    if (state.image) body.image = state.image;
    const response = await fetch("/v1/chat", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    if (!response.ok) {
      bubble.remove();
      await readJson(response);  // throws the server's message
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let reply = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event.type === "error") throw new Error(event.data.error ? event.data.error.message : "the reply failed");
        if (event.data.delta !== undefined) bubble.textContent += event.data.delta;
        if (event.data.done) reply = event.data.reply;
      }
    }
    if (reply === null) throw new Error("the reply ended early");
    bubble.textContent = reply;
    state.chat = [...messages, { role: "assistant", content: reply }];
  });
}

function parseEvent(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) type = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trim());
  }
  let parsed = {};
  try { parsed = JSON.parse(data.join("\n") || "{}"); } catch (error) { /* a malformed event is ignored */ }
  return { type, data: parsed };
}

function resetChat() {
  state.chat = [];
  $("#chat-log").replaceChildren();
}

// ---- wiring ------------------------------------------------------------------------------------

function start() {
  $("#api-key").value = localStorage.getItem("vlmkit-api-key") || "";
  if ($("#api-key").value) $("#key-box").hidden = false;
  $("#api-key").addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    localStorage.setItem("vlmkit-api-key", apiKey());
    loadModels();
  });
  setUpImage();
  $("#classify-run").addEventListener("click", classify);
  $("#search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("#search-text").value.trim();
    if (text) search({ text });
    else $(".error", $("#panel-search")).textContent = "type what to search for";
  });
  $("#search-image").addEventListener("click", () => {
    if (state.image) search({ image: state.image });
  });
  $("#caption-run").addEventListener("click", caption);
  $("#ask-form").addEventListener("submit", (event) => { event.preventDefault(); ask(); });
  $("#chat-form").addEventListener("submit", (event) => { event.preventDefault(); chat(); });
  $("#chat-reset").addEventListener("click", resetChat);
  loadModels();
}

document.addEventListener("DOMContentLoaded", start);
