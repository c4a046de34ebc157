// The playground page: builds a request from the form, streams its answer over SSE (fetch and a
// stream reader: EventSource cannot POST), and shows the same request as a curl command.
"use strict";

const $ = (id) => document.getElementById(id);
const NUMBERS = ["max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed"];
let running = null; // the AbortController of the request in flight
let listing = 0; // the latest adapter list request: an earlier one's late answer is dropped

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

// The form's parameters that are set (empty fields are left to the server).
function parameters() {
  const p = {};
  for (const name of NUMBERS) {
    const raw = $(name).value.trim();
    if (raw !== "") p[name] = Number(raw);
  }
  if ($("do_sample").checked) p.do_sample = true;
  const stop = $("stop").value.split("\n").filter((s) => s !== "");
  if (stop.length) p.stop = stop;
  const adapter = $("adapter_id").value.trim();
  if (adapter) p.adapter_id = adapter;
  if ($("adapter_source").value) p.adapter_source = $("adapter_source").value;
  return p;
}

// The request the form describes: its path and JSON body.
function buildRequest() {
  const p = parameters();
  if (mode() === "generate") {
    return { path: "generate_stream", body: { inputs: $("prompt").value, parameters: p } };
  }
  // OpenAI chat: the adapter is `model`; LoRAX's extras (top_k, adapter_source, ...) keep their names.
  const { adapter_id, max_new_tokens, do_sample, ...rest } = p;
  const body = { model: adapter_id || "", messages: [{ role: "user", content: $("prompt").value }] };
  if (max_new_tokens !== undefined) body.max_tokens = max_new_tokens;
  Object.assign(body, rest, { stream: true, logprobs: true });
  return { path: "v1/chat/completions", body };
}

function endpoint(path) {
  return new URL(path, document.baseURI).href;
}

function shellQuote(s) {
  return "'" + s.replace(/'/g, "'\\''") + "'";
}

function showCurl() {
  const { path, body } = buildRequest();
  $("prompt-hint").textContent = mode() === "generate" ? "(sent as inputs)" : "(the user message)";
  $("curl").textContent =
    `curl -N ${endpoint(path)} \\\n  -H 'content-type: application/json' \\\n  -d ${shellQuote(JSON.stringify(body))}`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function addToken(index, id, text, logprob, special) {
  const row = document.createElement("tr");
  for (const cell of [index, id ?? "", JSON.stringify(text), logprob?.toFixed(4) ?? "", special ? "yes" : ""]) {
    const td = document.createElement("td");
    td.textContent = cell;
    row.append(td);
  }
  $("tokens").append(row);
  $("token-count").textContent = index + 1;
}

// An error answer's text: the API's `{"error", "error_type"}` when it sent one.
async function errorText(response) {
  const raw = await response.text();
  try {
    const body = JSON.parse(raw);
    const e = body.error;
    if (typeof e === "string") return `${response.status} ${body.error_type ?? ""}: ${e}`;
    if (e && e.message) return `${response.status} ${e.type ?? ""}: ${e.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}: ${raw}`;
}

// Calls `onEvent` with each `data:` payload of an SSE body as it arrives.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data && data !== "[DONE]") onEvent(JSON.parse(data));
    }
  }
}

// One event of `/generate_stream` (LoRAX) or of the chat stream (OpenAI).
function handleEvent(event, state) {
  if (event.error) {
    const e = event.error;
    throw new Error(typeof e === "string" ? `${event.error_type ?? "error"}: ${e}` : e.message);
  }
  if (event.token) {
    const t = event.token;
    addToken(state.count++, t.id, t.text, t.logprob, t.special);
    if (!t.special) $("output").textContent += t.text;
    if (event.details) state.finish = event.details.finish_reason;
    return;
  }
  for (const choice of event.choices ?? []) {
    if (choice.delta?.content) $("output").textContent += choice.delta.content;
    for (const lp of choice.logprobs?.content ?? []) addToken(state.count++, null, lp.token, lp.logprob, false);
    if (choice.finish_reason) state.finish = choice.finish_reason;
  }
}

async function generate() {
  const { path, body } = buildRequest();
  showCurl();
  showError("");
  $("output").textContent = "";
  $("tokens").textContent = "";
  $("token-count").textContent = "0";
  running = new AbortController();
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("status").textContent = "generating…";
  const state = { count: 0, finish: null };
  try {
    const response = await fetch(endpoint(path), {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
      signal: running.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (event) => handleEvent(event, state));
    $("status").textContent = `done: ${state.count} tokens, finish_reason ${state.finish}`;
  } catch (err) {
    $("status").textContent = err.name === "AbortError" ? "stopped" : "failed";
    if (err.name !== "AbortError") showError(err.message);
  } finally {
    running = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
  loadAdapters(); // the request's adapter is tracked now
}

// Fills the adapter list from `GET /adapters` (the adapters the server tracks).
async function loadAdapters() {
  const list = $("adapter-list");
  const mine = ++listing;
  try {
    const response = await fetch(endpoint("adapters"));
    if (!response.ok) throw new Error(await errorText(response));
    const adapters = await response.json();
    if (mine !== listing) return;
    list.length = 1;
    for (const a of adapters) {
      const option = new Option(`${a.adapter_id} (${a.adapter_source}, ${a.state})`, a.adapter_id);
      option.dataset.source = a.adapter_source;
      list.add(option);
    }
    list.value = $("adapter_id").value.trim(); // keeps showing the adapter in use
    if (list.selectedIndex < 0) list.selectedIndex = 0;
  } catch (err) {
    showError(`listing adapters failed: ${err.message}`);
  }
}

async function loadInfo() {
  try {
    const info = await (await fetch(endpoint("info"))).json();
    $("model").textContent = `${info.model_id} · max_total_tokens ${info.max_total_tokens}`;
  } catch (_) { /* the page works without it */ }
}

async function copyCurl() {
  const text = $("curl").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copy").textContent = "copied";
  } catch (_) {
    // No clipboard outside secure contexts: select the text for Ctrl+C instead.
    getSelection().selectAllChildren($("curl"));
    $("copy").textContent = "selected";
  }
  setTimeout(() => ($("copy").textContent = "copy"), 1500);
}

function init() {
  $("adapter-list").addEventListener("change", (e) => {
    const option = e.target.selectedOptions[0];
    $("adapter_id").value = option.value;
    $("adapter_source").value = option.dataset.source ?? "";
    showCurl();
  });
  document.querySelector("main").addEventListener("input", showCurl);
  document.querySelector("main").addEventListener("change", showCurl);
  $("generate").addEventListener("click", generate);
  $("cancel").addEventListener("click", () => running?.abort());
  $("refresh").addEventListener("click", loadAdapters);
  $("copy").addEventListener("click", copyCurl);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
  });
  showCurl();
  loadInfo();
  loadAdapters();
}

init();
