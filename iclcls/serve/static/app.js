// The iclcls page: classify pasted texts, show ranked labels and the demonstrations the
// LM saw, add a class from example lines, list the classes (on load, and again whenever the
// API key changes). All text goes in via textContent (never HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = sessionStorage.getItem("iclcls-key") || "";
let keyTimer = null;
function keyChanged() {
  clearTimeout(keyTimer);
  keyTimer = null;
  sessionStorage.setItem("iclcls-key", keyInput.value);
  refreshClasses();
}
// as the key is typed (after a pause), and at once on Enter / leaving the field
keyInput.addEventListener("input", () => { clearTimeout(keyTimer); keyTimer = setTimeout(keyChanged, 400); });
keyInput.addEventListener("change", () => { if (keyTimer !== null) keyChanged(); });

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function lines(value) {
  return value.split("\n").map((s) => s.trim()).filter((s) => s.length > 0);
}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (keyInput.value) headers["Authorization"] = "Bearer " + keyInput.value;
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const msg = data && data.error ? data.error.message : resp.statusText;
    throw new Error(resp.status + ": " + (AUTH_HINTS[resp.status] || msg));
  }
  return data;
}

const AUTH_HINTS = {
  401: "this server needs an API key: type it in the API key field at the top",
  403: "the API key was refused: it is wrong, or this needs the admin key",
};

function setStatus(id, text, isError) {
  const s = $(id);
  s.textContent = text;
  s.classList.toggle("error", !!isError);
}

function renderPrediction(text, p) {
  const box = el("div", "prediction");
  box.appendChild(el("div", "text", text));
  const ol = el("ol", "labels");
  p.labels.forEach((lab, i) => {
    const li = el("li");
    li.appendChild(el("span", "label", lab));
    const s = p.scores[i];
    li.appendChild(el("span", "score", s === null || s === undefined ? "" : s.toFixed(3)));
    ol.appendChild(li);
  });
  box.appendChild(ol);
  const details = el("details", "demos");
  const demos = p.demonstrations || [];
  details.appendChild(el("summary", null, demos.length
    ? "demonstrations the LM saw (" + demos.length + ")"
    : "no demonstrations (the retriever ranked alone)"));
  const ul = el("ul");
  demos.forEach((d) => {
    const li = el("li");
    li.appendChild(el("span", "label", d.label || ""));
    li.appendChild(document.createTextNode(": " + d.text));
    ul.appendChild(li);
  });
  details.appendChild(ul);
  if (p.candidates) details.appendChild(el("div", "candidates", "candidates: " + p.candidates.join(", ")));
  box.appendChild(details);
  return box;
}

$("classify").addEventListener("click", async () => {
  const texts = lines($("texts").value);
  if (!texts.length) { setStatus("classify-status", "type a text first", true); return; }
  setStatus("classify-status", "classifying…");
  const t0 = performance.now();
  try {
    const data = await api("POST", "/v1/classify", { texts, top_k: Number($("top-k").value) || 5, trace: true });
    const results = $("results");
    results.replaceChildren(...data.predictions.map((p, i) => renderPrediction(texts[i], p)));
    setStatus("classify-status", texts.length + " classified in " + Math.round(performance.now() - t0) + " ms");
  } catch (e) {
    setStatus("classify-status", e.message, true);
  }
});

$("add-class").addEventListener("click", async () => {
  const label = $("new-label").value.trim();
  const examples = lines($("new-examples").value);
  if (!label || !examples.length) { setStatus("add-status", "give a label and at least one example", true); return; }
  const body = { examples: examples.map((text) => ({ text, label })) };
  const desc = $("new-description").value.trim();
  if (desc) body.descriptions = { [label]: desc };
  setStatus("add-status", "adding…");
  try {
    const r = await api("POST", "/v1/classes", body);
    setStatus("add-status", "added " + r.added_examples + " examples of " + label + " (" + r.classes + " classes)");
    $("new-examples").value = "";
    await refreshClasses();
  } catch (e) {
    setStatus("add-status", e.message, true);
  }
});

let listing = 0; // the latest listing wins when the key changes while one is in flight

async function refreshClasses() {
  const mine = ++listing;
  setStatus("classes-status", "loading the classes…");
  try {
    const data = await api("GET", "/v1/classes");
    if (mine !== listing) return;
    $("class-count").textContent = "(" + data.count + ")";
    $("classes").replaceChildren(...data.classes.map((c) => {
      const li = el("li", null, c.label + " (" + c.examples + ")");
      if (c.description) li.title = c.description;
      return li;
    }));
    setStatus("classes-status", data.count ? "" : "no classes yet");
  } catch (e) {
    if (mine !== listing) return;
    $("class-count").textContent = "";
    $("classes").replaceChildren();
    setStatus("classes-status", "cannot list the classes: " + e.message, true);
  }
}

refreshClasses();
