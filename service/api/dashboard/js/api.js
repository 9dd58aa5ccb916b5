// The API client: JSON calls and Server-Sent Events, both with `Authorization: Bearer <key>`.
//
// EventSource cannot send headers, so event streams are read with fetch() and a small parser
// of the text/event-stream format (https://html.spec.whatwg.org/multipage/server-sent-events.html).
// A 401 anywhere opens the key prompt; the call is retried once a key has been entered.

const KEY_STORAGE = "mcdrop.apiKey";

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }

  /** "detail" plus one line per error: "body › model › dropout: msg". */
  describe() {
    const lines = [this.message];
    for (const error of this.problem.errors || []) {
      const where = (error.loc || []).filter((part) => part !== "body").join(" › ");
      lines.push(where ? `${where}: ${error.msg}` : error.msg);
    }
    return lines.join("\n");
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  document.dispatchEvent(new CustomEvent("mcdrop:key-changed"));
}

// The key prompt (index.html's <dialog id="key-dialog">); callers waiting for a key share it.
let waitingForKey = null;

/** Show the key prompt (with why) and resolve when a key was saved; reject on cancel. */
export function askForKey(reason) {
  const dialog = document.getElementById("key-dialog");
  document.getElementById("key-reason").textContent = reason || "";
  if (!waitingForKey) {
    waitingForKey = new Promise((resolve, reject) => {
      const form = dialog.querySelector("form");
      const input = document.getElementById("key-input");
      const done = (saved) => {
        form.removeEventListener("submit", onSubmit);
        dialog.removeEventListener("cancel", onCancel);
        document.getElementById("key-cancel").removeEventListener("click", onCancel);
        waitingForKey = null;
        if (dialog.open) dialog.close();
        if (saved) resolve(); else reject(new ApiError(401, { detail: reason || "an API key is required" }));
      };
      const onSubmit = (event) => {
        event.preventDefault();
        const key = input.value.trim();
        if (!key) return;
        setApiKey(key);
        input.value = "";
        done(true);
      };
      const onCancel = (event) => {
        event.preventDefault();
        done(false);
      };
      form.addEventListener("submit", onSubmit);
      dialog.addEventListener("cancel", onCancel);
      document.getElementById("key-cancel").addEventListener("click", onCancel);
    });
  }
  if (!dialog.open) dialog.showModal();
  document.getElementById("key-input").focus();
  return waitingForKey;
}

function headers(extra = {}) {
  const result = { ...extra };
  const key = apiKey();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function problemOf(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return { detail: text.slice(0, 300) || response.statusText };
  }
}

/** Call the API; JSON in and out. Throws ApiError (with the problem+json body) on 4xx/5xx. */
export async function api(path, { method = "GET", body, signal } = {}) {
  for (;;) {
    const init = { method, signal, headers: headers({ Accept: "application/json" }) };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const response = await fetch(path, init);
    if (response.status === 401) {
      const problem = await problemOf(response);
      await askForKey(apiKey() ? `The API key was refused: ${problem.detail}` : problem.detail);
      continue;
    }
    if (!response.ok) throw new ApiError(response.status, await problemOf(response));
    if (response.status === 204) return null;
    return response.json();
  }
}

/** Split a text/event-stream into messages {event, data, id}; `feed(chunk)` returns the
 * messages completed by that chunk. Comments are dropped; `lastEventId` and `retry` (the
 * server's reconnection delay in ms, null until sent) persist across messages. */
export class EventStreamParser {
  constructor() {
    this.buffer = "";
    this.lastEventId = "";
    this.retry = null;
    this.reset();
  }

  reset() {
    this.event = "";
    this.data = [];
  }

  feed(chunk) {
    this.buffer += chunk;
    const messages = [];
    // A line ends at \r\n, \n or \r; a \r at the very end may be half of a \r\n: keep it.
    const pattern = /\r\n|\n|\r(?!$)/g;
    let start = 0;
    let match;
    while ((match = pattern.exec(this.buffer)) !== null) {
      const line = this.buffer.slice(start, match.index);
      start = match.index + match[0].length;
      const message = this.line(line);
      if (message) messages.push(message);
    }
    this.buffer = this.buffer.slice(start);
    return messages;
  }

  line(line) {
    if (line === "") {
      if (!this.data.length && !this.event) {
        this.reset();
        return null;
      }
      const message = { event: this.event || "message", data: this.data.join("\n"), id: this.lastEventId };
      this.reset();
      return message;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
    return null;
  }
}

/**
 * Follow an SSE endpoint: onMessage({event, data (parsed JSON), id}) for each message.
 * Reconnects (with Last-Event-ID, after the server's `retry` delay or a growing one) when the
 * stream drops or ends, until `signal` aborts, or the stream ends and `finished()` is true
 * (e.g. a run's stream after its terminal event). Resolves when it stops; throws the
 * ApiError of a 4xx answer (other than 401, which asks for a key and retries).
 */
export async function follow(path, onMessage, { signal, finished = () => false, onState = () => {} } = {}) {
  let lastEventId = "";
  let delay = 1000;
  while (!signal?.aborted) {
    let ended = false;
    try {
      const extra = { Accept: "text/event-stream" };
      if (lastEventId) extra["Last-Event-ID"] = lastEventId;
      const response = await fetch(path, { headers: headers(extra), signal, cache: "no-store" });
      if (response.status === 401) {
        const problem = await problemOf(response);
        await askForKey(apiKey() ? `The API key was refused: ${problem.detail}` : problem.detail);
        continue;
      }
      if (!response.ok) throw new ApiError(response.status, await problemOf(response));
      onState("open");
      delay = 1000;
      const parser = new EventStreamParser();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const message of parser.feed(value)) {
          lastEventId = message.id || lastEventId;
          let data = message.data;
          try {
            data = data ? JSON.parse(data) : null;
          } catch {
            /* not JSON: pass the text */
          }
          onMessage({ event: message.event, data, id: message.id });
        }
      }
      if (parser.retry !== null) delay = parser.retry;
      ended = true;
    } catch (error) {
      if (signal?.aborted) return;
      if (error instanceof ApiError && error.status < 500 && error.status !== 429) {
        onState("error", error);
        throw error;
      }
      onState("reconnecting", error);
    }
    if (ended && finished()) {
      onState("closed");
      return;
    }
    if (ended) onState("reconnecting");
    await sleep(delay, signal);
    delay = Math.min(delay * 2, 15000);
  }
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}
