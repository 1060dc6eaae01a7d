// The playground: plain JavaScript against this server's own API (same origin), no build step, no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "mlx-gateway.playground.api-key";

const chat = {
  history: [], // the conversation as sent: {role, content}
  controller: null, // aborts the answer being streamed
};

function requestHeaders(withBody) {
  const headers = {};
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (withBody) headers["Content-Type"] = "application/json";
  return headers;
}

// The server's own words for a failed request: OpenAI's {"error": {"message": ...}}.
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) {
    // not JSON: fall through to the status line
  }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: requestHeaders(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

function setStatus(id, text, isError) {
  const element = $(id);
  element.textContent = text || "";
  element.classList.toggle("error", Boolean(isError));
}

// ---- models and prefix caches ----

async function loadModels() {
  const select = $("model");
  const previous = select.value;
  try {
    const models = await api("GET", "/v1/models");
    select.replaceChildren(
      ...models.data.map((model) => new Option(model.id, model.id, false, model.id === previous)),
    );
    setStatus("chat-status", "");
  } catch (error) {
    select.replaceChildren();
    setStatus("chat-status", `Models: ${error.message}`, true);
  }
}

function formatBytes(bytes) {
  if (bytes >= 1 << 20) return `${(bytes / (1 << 20)).toFixed(1)} MiB`;
  if (bytes >= 1 << 10) return `${(bytes / (1 << 10)).toFixed(1)} KiB`;
  return `${bytes} B`;
}

function cacheItem(cache) {
  const item = document.createElement("li");
  item.dataset.name = cache.id;
  const name = document.createElement("strong");
  name.textContent = cache.id;
  const facts = document.createElement("span");
  facts.className = "facts";
  facts.textContent = `${cache.model} · ${cache.num_tokens} tokens · ${formatBytes(cache.size_bytes)} · ${cache.hits} hits`;
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "delete secondary";
  remove.textContent = "Delete";
  remove.title = `Delete the prefix cache ${cache.id}`;
  remove.addEventListener("click", () => deleteCache(cache.id));
  item.append(name, facts, remove);
  return item;
}

async function loadCaches(select) {
  const picker = $("cache");
  const wanted = select === undefined ? picker.value : select;
  try {
    const list = await api("GET", "/admin/prefix-caches");
    const model = $("model").value;
    // Only a cache built for the chosen model can be used with it.
    const usable = list.data.filter((cache) => cache.model === model);
    picker.replaceChildren(
      new Option("none", ""),
      ...usable.map((cache) => new Option(`${cache.id} (${cache.num_tokens} tokens)`, cache.id, false, cache.id === wanted)),
    );
    $("caches").replaceChildren(...list.data.map(cacheItem));
    if (!list.data.length) setStatus("cache-status", "No prefix caches yet.");
    else setStatus("cache-status", "");
  } catch (error) {
    picker.replaceChildren(new Option("none", ""));
    $("caches").replaceChildren();
    setStatus("cache-status", error.message, true);
  }
}

async function createCache(event) {
  event.preventDefault();
  const name = $("cache-name").value.trim();
  const body = {
    name,
    model: $("model").value,
    messages: [{ role: "system", content: $("cache-system").value }],
  };
  const button = $("create");
  button.disabled = true;
  setStatus("cache-status", `Building ${name}…`);
  try {
    const cache = await api("POST", "/admin/prefix-caches", body);
    $("cache-name").value = "";
    await loadCaches(cache.id);
    setStatus("cache-status", `Built ${cache.id}: ${cache.num_tokens} tokens in ${cache.build_seconds.toFixed(2)} s.`);
  } catch (error) {
    setStatus("cache-status", error.message, true);
  } finally {
    button.disabled = false;
  }
}

async function deleteCache(name) {
  try {
    await api("DELETE", `/admin/prefix-caches/${encodeURIComponent(name)}`);
    await loadCaches();
    setStatus("cache-status", `Deleted ${name}.`);
  } catch (error) {
    setStatus("cache-status", error.message, true);
  }
}

// ---- chat ----

function addMessage(role, text) {
  const empty = $("messages").querySelector(".empty");
  if (empty) empty.remove();
  const message = document.createElement("article");
  message.className = `message ${role}`;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  message.append(content);
  $("messages").append(message);
  message.scrollIntoView({ block: "end" });
  return message;
}

// The data of each server-sent event (sse-starlette ends lines with \r\n; comments are keep-alive pings).
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = /\r\n\r\n|\n\n/.exec(buffer)) !== null) {
      const block = buffer.slice(0, end.index);
      buffer = buffer.slice(end.index + end[0].length);
      const data = block
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

function stat(label, value, title) {
  const item = document.createElement("span");
  item.className = "stat";
  item.dataset.stat = label;
  item.title = title;
  const name = document.createElement("b");
  name.textContent = label;
  item.append(name, ` ${value}`);
  return item;
}

function showStats(message, numbers) {
  const stats = document.createElement("div");
  stats.className = "stats";
  const { started, first, end, usage, chunks, prefixHeader, finish } = numbers;
  const completion = usage ? usage.completion_tokens : chunks;
  // Decode speed: the tokens after the first, over the time after the first.
  const decodeSeconds = first === null ? 0 : (end - first) / 1000;
  const tokensPerSecond = completion > 1 && decodeSeconds > 0 ? ((completion - 1) / decodeSeconds).toFixed(1) : "–";
  stats.append(
    stat("TTFT", first === null ? "–" : `${Math.round(first - started)} ms`, "Time to the first token"),
    stat("tokens/s", tokensPerSecond, "Decode speed: tokens after the first over the time after the first"),
    stat("completion", `${completion} tokens`, `Generated tokens (finish_reason: ${finish || "?"})`),
  );
  if (usage) {
    const details = usage.prompt_tokens_details;
    const cached = details && details.cached_tokens !== undefined ? details.cached_tokens : 0;
    stats.append(
      stat("prompt", `${usage.prompt_tokens} tokens`, "Prompt tokens, the prefix cache's included"),
      stat("cached", `${cached} tokens`, "Prompt tokens taken from the prefix cache (usage.prompt_tokens_details)"),
    );
  }
  if (prefixHeader) stats.append(stat("x-prefix-cache", prefixHeader, "The response's x-prefix-cache header"));
  message.append(stats);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  const model = $("model").value;
  if (!text || chat.controller) return;
  if (!model) {
    setStatus("chat-status", "No model to talk to: the server listed none.", true);
    return;
  }
  $("prompt").value = "";
  setStatus("chat-status", "");
  addMessage("user", text);
  chat.history.push({ role: "user", content: text });
  const answer = addMessage("assistant", "");
  answer.classList.add("streaming");
  const body = {
    model,
    messages: chat.history,
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || 128,
    temperature: Number($("temperature").value),
  };
  const cache = $("cache").value;
  if (cache) body.prefix_cache = cache;

  chat.controller = new AbortController();
  setBusy(true);
  const numbers = { started: performance.now(), first: null, end: null, usage: null, chunks: 0, prefixHeader: null };
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: requestHeaders(true),
      body: JSON.stringify(body),
      signal: chat.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    numbers.prefixHeader = response.headers.get("x-prefix-cache");
    for await (const data of serverSentEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message); // a failure after the first byte
      if (chunk.usage) numbers.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          if (numbers.first === null) numbers.first = performance.now();
          numbers.chunks += 1;
          reply += delta;
          answer.querySelector(".content").textContent = reply;
          answer.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) numbers.finish = choice.finish_reason;
      }
    }
    numbers.end = performance.now();
    chat.history.push({ role: "assistant", content: reply });
    showStats(answer, numbers);
  } catch (error) {
    const stopped = error.name === "AbortError";
    if (stopped && reply) {
      chat.history.push({ role: "assistant", content: reply });
      numbers.end = performance.now();
      numbers.finish = "stopped";
      showStats(answer, numbers);
    } else {
      chat.history.pop(); // the question was not answered: sending it again must not repeat it
      answer.classList.add("failed");
      answer.querySelector(".content").textContent = stopped ? "(stopped)" : error.message;
    }
  } finally {
    answer.classList.remove("streaming");
    chat.controller = null;
    setBusy(false);
    if (cache) loadCaches(); // its hit count moved
  }
}

function clearChat() {
  if (chat.controller) chat.controller.abort();
  chat.history = [];
  $("messages").replaceChildren();
  setStatus("chat-status", "");
}

function start() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", async () => {
    localStorage.setItem(KEY_STORAGE, key.value.trim());
    await loadModels();
    await loadCaches();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    key.dispatchEvent(new Event("change"));
  });
  $("model").addEventListener("change", () => loadCaches());
  $("create-cache").addEventListener("submit", createCache);
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("clear").addEventListener("click", clearChat);
  loadModels().then(() => loadCaches());
}

start();
