// The API client. The key lives in sessionStorage (this tab only, gone when it closes) and travels only in the
// Authorization header: never in a URL, so it is in no access log, history entry or Referer. Live events are read
// with fetch (a browser EventSource cannot send headers) and downloads go through fetch and a blob: URL.

const KEY_NAME = "dama.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.param = error.param || null;
    this.errors = error.errors || null;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_NAME, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_NAME);
}

function headers(extra = {}) {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

/** The ApiError of a failed response (a 401 also tells the console to sign in again). */
export async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (response.status === 401) window.dispatchEvent(new CustomEvent("dama:unauthorized"));
  return new ApiError(response.status, body);
}

/** JSON from the API: api("/jobs"), api("/jobs", {method: "POST", json: {...}}). */
export async function api(path, { method = "GET", json, query, headers: extra, signal } = {}) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
  }
  const init = { method, headers: headers(extra), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await fetch(url, init);
  if (!response.ok) throw await failure(response);
  if (response.status === 204) return null;
  return response.json();
}

/** The raw response of a GET (binary or text bodies). */
export async function fetchRaw(path, { signal } = {}) {
  const response = await fetch(path, { headers: headers(), signal });
  if (!response.ok) throw await failure(response);
  return response;
}

/** A blob: URL for an image the API serves behind the key (caller revokes it when the view goes away). */
export async function imageUrl(path, { signal } = {}) {
  const response = await fetchRaw(path, { signal });
  return URL.createObjectURL(await response.blob());
}

/** Save a file from the API: fetched with the header, handed to the browser as a blob: download. */
export async function download(path, fallbackName) {
  const response = await fetchRaw(path);
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename="?([^";]+)"?/.exec(disposition);
  const blob = await response.blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = match ? match[1] : fallbackName;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
  return { name: link.download, size: blob.size, sha256: response.headers.get("X-Content-SHA256") };
}

/** Parse one SSE frame ("id: 7\nevent: stage\ndata: {...}") into its fields. */
function parseFrame(frame) {
  const fields = { data: [] };
  for (const line of frame.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (name === "data") fields.data.push(value);
    else fields[name] = value;
  }
  return fields;
}

/**
 * Follow a live event stream (text/event-stream) with fetch and the Authorization header; calls onEvent with
 * each parsed event object. Resolves when the server ends the stream (the job ended) or the signal aborts;
 * reconnects from the last seq when the connection drops.
 */
export async function followEvents(path, onEvent, { signal, after = 0 } = {}) {
  let last = after;
  for (let attempt = 0; !signal?.aborted; attempt += 1) {
    try {
      const response = await fetch(`${path}?after=${last}`, {
        headers: headers({ Accept: "text/event-stream" }),
        signal,
      });
      if (!response.ok) throw await failure(response);
      const reader = response.body.getReader(); // decoded here: no internal pipe to error on abort
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const frame = parseFrame(buffer.slice(0, cut));
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
          if (!frame.data.length) continue;
          const event = JSON.parse(frame.data.join("\n"));
          if (typeof event.seq === "number") last = event.seq;
          onEvent(event);
        }
      }
    } catch (error) {
      if (signal?.aborted || error instanceof ApiError) throw error;
      await new Promise((resolve) => setTimeout(resolve, Math.min(5000, 500 * 2 ** attempt)));
    }
  }
}

/** Upload a dataset with progress (XMLHttpRequest: fetch has no upload progress). */
export function uploadDataset(file, { name, format, onProgress }) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("file", file, file.name);
    if (name) form.append("name", name);
    if (format) form.append("format", format);
    const request = new XMLHttpRequest();
    request.open("POST", "/datasets");
    for (const [header, value] of Object.entries(headers({ "Idempotency-Key": crypto.randomUUID() }))) {
      request.setRequestHeader(header, value);
    }
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    request.addEventListener("load", () => {
      let body = null;
      try {
        body = JSON.parse(request.responseText);
      } catch {
        body = null;
      }
      if (request.status >= 200 && request.status < 300) resolve(body);
      else reject(new ApiError(request.status, body));
    });
    request.addEventListener("error", () => reject(new ApiError(0, { error: { message: "network error" } })));
    request.send(form);
  });
}
