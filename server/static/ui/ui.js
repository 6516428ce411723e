// The search page: lists tasks (GET /tasks), searches (POST /search) with a text or an image
// (sent as a data URI), and shows the hits. Every failure shows the server's own message.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null };

function headers() {
  const key = $("api-key").value.trim();
  localStorage.setItem("lpi-api-key", key);
  const out = { "Content-Type": "application/json" };
  if (key) out.Authorization = "Bearer " + key;
  return out;
}

function say(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function call(method, path, body) {
  let response;
  try {
    response = await fetch(path, { method, headers: headers(), body: body && JSON.stringify(body) });
  } catch (err) {
    throw new Error("the server did not answer (" + err.message + ")");
  }
  const text = await response.text();
  let data = null;
  try { data = JSON.parse(text); } catch (_) { /* not JSON: reported below */ }
  if (!response.ok) {
    const error = data && data.error;
    const message = error ? error.message + (error.field ? " (field: " + error.field + ")" : "")
                          : text.slice(0, 300) || "HTTP " + response.status;
    throw new Error(response.status + " " + (error ? error.type : "error") + ": " + message);
  }
  if (data === null) throw new Error("the server's answer is not JSON");
  return data;
}

async function loadTasks() {
  const select = $("task");
  const previous = select.value || localStorage.getItem("lpi-task");
  try {
    const { tasks } = await call("GET", "/tasks");
    select.replaceChildren(...tasks.map((t) => new Option(t.task + "  (" + t.vectors + " stored)", t.task)));
    if (tasks.some((t) => t.task === previous)) select.value = previous;
    say(tasks.length ? tasks.length + " tasks loaded; type a query or drop an image." :
        "No task is loaded: load one (PUT /tasks/NAME) first.", !tasks.length);
  } catch (err) {
    select.replaceChildren();
    say(err.message, true);
  }
}

function cell(tag, text, cls) {
  const el = document.createElement(tag);
  el.textContent = text;
  if (cls) el.className = cls;
  return el;
}

function showHits(answer) {
  const list = $("hits");
  list.replaceChildren();
  for (const hit of answer.hits) {
    const item = cell("li", "", "hit");
    const thumb = hit.payload.thumbnail;
    if (typeof thumb === "string" && thumb.startsWith("data:image/")) {
      const img = document.createElement("img");
      img.className = "thumb";
      img.src = thumb;
      img.alt = hit.id;
      item.append(img);
    } else {
      item.append(cell("div", "no thumbnail", "nothumb"));
    }
    const top = cell("div", "", "top");
    top.append(cell("span", hit.id, "id"), cell("span", hit.score.toFixed(4), "score"));
    item.append(top);
    const fields = document.createElement("dl");
    for (const [key, value] of Object.entries(hit.payload)) {
      if (key === "thumbnail") continue;
      fields.append(cell("dt", key), cell("dd", JSON.stringify(value)));
    }
    item.append(fields);
    list.append(item);
  }
  const what = state.image ? "the image" : JSON.stringify($("query").value);
  say(answer.hits.length ? answer.hits.length + " hits for " + what + " in " + answer.task +
      " (prompt version " + answer.index_version.slice(0, 12) + ")" :
      "No stored item of " + answer.task + " matches (nothing indexed under its serving version?).",
      false);
}

async function search(event) {
  event.preventDefault();
  const task = $("task").value;
  if (!task) { say("Choose a task first.", true); return; }
  localStorage.setItem("lpi-task", task);
  const text = $("query").value.trim();
  if (!text && !state.image) { say("Type a query or drop an image.", true); return; }
  const query = state.image ? { image: state.image } : { text };
  say("Searching\u2026", false);
  $("hits").replaceChildren();
  try {
    const topK = parseInt($("top-k").value, 10) || 8;
    showHits(await call("POST", "/search", { task, query, top_k: topK }));
  } catch (err) {
    say(err.message, true);
  }
}

function useFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;  // a data URI: the server accepts it as base64
    $("drop-preview").src = reader.result;
    $("drop-preview").hidden = false;
    $("drop-text").textContent = file.name + " (type a text to search by text instead)";
    $("query").value = "";
    $("search").requestSubmit();
  };
  reader.onerror = () => say("could not read " + file.name, true);
  reader.readAsDataURL(file);
}

function clearImage() {
  state.image = null;
  $("drop-preview").hidden = true;
  $("drop-text").textContent = "\u2026or drop an image here (or click to choose one)";
}

window.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem("lpi-api-key") || "";
  $("search").addEventListener("submit", search);
  $("reload").addEventListener("click", loadTasks);
  $("api-key").addEventListener("change", loadTasks);
  $("query").addEventListener("input", () => { if ($("query").value) clearImage(); });
  const drop = $("drop");
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("file").addEventListener("change", () => useFile($("file").files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  loadTasks();
});
