// The chat playground: one prompt (and image) put to two models at once, their answers streamed side by side from
// POST /v1/chat/completions (fetch + ReadableStream with the Authorization header, as api.js follows events). With
// an image from a generative dataset's row, both answers are then judged against the row's objects by the
// service's CHAIR matcher (POST /playground/judge, run by the inference backend) and their mentions marked.

import { ApiError, api, failure, fetchRaw, getKey } from "../api.js";
import { errorBox, fmt, h, mount } from "../dom.js";

const SIDES = ["left", "right"];
const MODEL_ID = /^[\w./:-]{1,200}$/;

/** The playground's hash link: #/playground?left=dama/tiny-llava&right=job_... (for a job page to link to). */
export function playgroundLink(left, right) {
  const query = new URLSearchParams();
  if (left) query.set("left", left);
  if (right) query.set("right", right);
  return `#/playground?${query}`;
}

/**
 * Stream one chat completion: `onText(delta)` for each piece of the answer as it arrives. Resolves with
 * {finishReason, usage} at `data: [DONE]`; rejects with an ApiError for a refusal (HTTP status) or an error event
 * sent after the stream started, and with an AbortError when `signal` fires (the request is then closed, so the
 * service stops generating).
 */
async function streamChat(body, onText, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { Authorization: `Bearer ${getKey()}`, "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader(); // decoded here: no internal pipe to error on abort
  const decoder = new TextDecoder();
  const result = { finishReason: null, usage: null };
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new ApiError(502, { error: { message: "the stream ended before the answer did" } });
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = frame
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") {
        reader.cancel().catch(() => null);
        return result;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.status || 502, chunk);
      if (chunk.usage) result.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta?.content) onText(choice.delta.content);
        if (choice.finish_reason) result.finishReason = choice.finish_reason;
      }
    }
  }
}

/** A blob or file as a data: URI (what the chat request carries), labelled as an image. */
function dataUri(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.addEventListener("load", () => {
      const uri = String(reader.result);
      // A file the browser could not type reads as application/octet-stream: the service checks the bytes anyway.
      resolve(uri.startsWith("data:image/") ? uri : uri.replace(/^data:[^;,]*/, "data:image/png"));
    });
    reader.addEventListener("error", () => reject(reader.error));
    reader.readAsDataURL(blob);
  });
}

function modelLabel(model) {
  return model.base_model ? `${model.id} · tuned ${model.base_model}` : `${model.id} (base)`;
}

/** The models' picker, with `chosen` selected (added as an option when the list lacks it, e.g. job_...:STEP). */
function modelPicker(side, models, chosen) {
  const select = h("select", { id: `playground-${side}`, name: side });
  const bases = models.filter((m) => !m.base_model);
  const jobs = models.filter((m) => m.base_model);
  if (chosen && !models.some((m) => m.id === chosen)) select.append(h("option", { value: chosen }, chosen));
  if (bases.length) select.append(h("optgroup", { label: "base models" }, bases.map((m) => h("option", { value: m.id }, modelLabel(m)))));
  if (jobs.length) select.append(h("optgroup", { label: "your tuned models" }, jobs.map((m) => h("option", { value: m.id }, modelLabel(m)))));
  if (chosen) select.value = chosen;
  return select;
}

/** Defaults: a base on the left, the newest tuned model on the right (or the hash's ?left= / ?right=). */
function defaults(models, query) {
  const pick = (name) => {
    const value = query.get(name);
    return value && MODEL_ID.test(value) ? value : null;
  };
  const bases = models.filter((m) => !m.base_model);
  const jobs = models.filter((m) => m.base_model).sort((a, b) => b.created - a.created);
  const left = pick("left") || bases[0]?.id || models[0]?.id || null;
  const right = pick("right") || jobs[0]?.id || bases.find((m) => m.id !== left)?.id || left;
  return { left, right };
}

async function generativeDatasets(signal) {
  const found = [];
  let after = null;
  for (let page = 0; page < 20; page += 1) {
    const listed = await api("/datasets", { query: { limit: 100, after }, signal });
    found.push(...listed.data.filter((d) => d.format === "generative"));
    if (!listed.has_more || !listed.next_cursor) break;
    after = listed.next_cursor;
  }
  return found;
}

/** The answer's text with each mention marked (offsets are Python's: code points, so the text is split as such). */
export function markedAnswer(text, judgement) {
  const chars = Array.from(text);
  const mentions = [...(judgement.mentions || [])].sort((a, b) => a.start - b.start);
  const parts = [];
  let at = 0;
  for (const mention of mentions) {
    if (mention.start < at || mention.end <= mention.start || mention.end > chars.length) continue;
    parts.push(chars.slice(at, mention.start).join(""));
    const kind = mention.hallucinated ? "hallucinated" : "grounded";
    parts.push(
      h(
        "mark",
        { class: `mention ${kind}`, title: `${mention.object}: ${kind}`, dataset: { object: mention.object } },
        chars.slice(mention.start, mention.end).join(""),
      ),
    );
    at = mention.end;
  }
  parts.push(chars.slice(at).join(""));
  return parts;
}

function judgementLines(judgement) {
  const line = (name, values) =>
    h("div", { class: `judged judged-${name}`, dataset: { kind: name } }, h("b", null, `${name}: `), values.length ? values.join(", ") : "none");
  return h(
    "div",
    { class: "judgement" },
    line("hallucinated", judgement.hallucinated || []),
    line("covered", judgement.covered || []),
    line("missed", judgement.missed || []),
  );
}

/** One side's column: the model's name, its state, the answer as it streams, and later its judgement. */
function column(side) {
  const title = h("h2", null, side);
  const state = h("span", { class: "muted playground-state" }, "");
  const answer = h("div", { class: "playground-answer", dataset: { state: "idle" } });
  const below = h("div", { class: "playground-below" });
  const element = h("section", { class: "card playground-column", id: `playground-answer-${side}` }, h("div", { class: "toolbar" }, title, state), answer, below);
  return {
    element,
    answer,
    reset(model) {
      title.textContent = model;
      state.textContent = "waiting for the first token...";
      answer.dataset.state = "streaming";
      answer.replaceChildren();
      below.replaceChildren();
    },
    text: "",
    state,
    below,
  };
}

export async function playgroundPage(view, { query, signal }) {
  const urls = [];
  const revoke = () => urls.splice(0).forEach((url) => URL.revokeObjectURL(url));
  signal.addEventListener("abort", revoke);
  const [models, datasets] = await Promise.all([api("/v1/models", { signal }), generativeDatasets(signal)]);
  const chosen = defaults(models.data, query);
  const pickers = Object.fromEntries(SIDES.map((side) => [side, modelPicker(side, models.data, chosen[side])]));

  // The image: a generative dataset's row (its image and prompt, and objects to judge the answers by) or a file.
  const fromRow = h("input", { type: "radio", name: "source", value: "row", id: "playground-source-row" });
  const fromFile = h("input", { type: "radio", name: "source", value: "file", id: "playground-source-file" });
  const datasetPicker = h(
    "select",
    { id: "playground-dataset" },
    datasets.map((d) => h("option", { value: d.id }, `${d.name} · ${d.row_count} rows`)),
  );
  const rowInput = h("input", { type: "number", id: "playground-row", min: 1, value: 1, size: 5 });
  const fileInput = h("input", { type: "file", id: "playground-file", accept: "image/*" });
  const preview = h("img", { class: "thumb playground-image", id: "playground-image", alt: "the image both models see", hidden: true });
  const imageNote = h("div", { class: "muted", id: "playground-image-note" });
  const prompt = h("textarea", { id: "playground-prompt", rows: 3, placeholder: "Ask about the image..." });
  const maxTokens = h("input", { type: "number", id: "playground-max-tokens", min: 1, max: 1024, value: 64, size: 6 });
  const ask = h("button", { type: "submit", id: "playground-ask" }, "Ask both");
  const stop = h("button", { type: "button", id: "playground-stop", hidden: true }, "Stop");
  const message = h("div", { id: "playground-message" });
  const columns = Object.fromEntries(SIDES.map((side) => [side, column(side)]));
  const marks = h("div", { class: "playground-marks", id: "playground-marks", hidden: true });

  const sourceNote = h("span", { class: "muted" });
  const rowFields = h("span", { class: "source-fields", id: "playground-row-fields" }, h("label", null, "Dataset ", datasetPicker), h("label", null, "Row ", rowInput));
  const fileFields = h("span", { class: "source-fields", id: "playground-file-fields", hidden: true }, h("label", null, "Image ", fileInput));
  let image = null; // {uri, dataset_id, row, objects} for a row; {uri} for a file

  const showImage = (blob) => {
    revoke();
    const url = URL.createObjectURL(blob);
    urls.push(url);
    preview.src = url;
    preview.hidden = false;
  };
  const clearImage = (note = "") => {
    image = null;
    preview.hidden = true;
    preview.removeAttribute("src");
    imageNote.textContent = note;
  };

  let imageLoad = 0; // the latest image asked for: an older row or file that arrives later is dropped
  const loadRow = async () => {
    const load = ++imageLoad;
    const datasetId = datasetPicker.value;
    const row = Number.parseInt(rowInput.value, 10);
    if (!datasetId || !(row >= 1)) return clearImage(datasets.length ? "Pick a row (1 or more)." : "");
    clearImage("loading the row...");
    try {
      const page = await api(`/datasets/${datasetId}/rows`, { query: { offset: row - 1, limit: 1 }, signal });
      const item = page.data.find((r) => r.row === row) || page.data[0];
      if (!item) throw new Error(`row ${row} is not among the ${page.sampled_rows} rows of the preview`);
      rowInput.max = String(page.sampled_rows);
      const path = (item.images || []).find(Boolean);
      if (!path) throw new Error(`row ${row} has no raster image`);
      const blob = await (await fetchRaw(path, { signal })).blob();
      const uri = await dataUri(blob);
      if (load !== imageLoad) return;
      showImage(blob);
      image = { uri, dataset_id: datasetId, row: item.row, objects: item.objects || [] };
      prompt.value = item.prompt || prompt.value;
      imageNote.textContent = `row ${item.row} · ${item.row_id} · objects: ${(item.objects || []).join(", ") || "none"}`;
    } catch (error) {
      if (error.name === "AbortError" || load !== imageLoad) return;
      clearImage();
      mount(imageNote, errorBox(error));
    }
  };
  const loadFile = async () => {
    const load = ++imageLoad;
    const file = fileInput.files[0];
    if (!file) return clearImage("Choose an image file.");
    try {
      const uri = await dataUri(file);
      if (load !== imageLoad) return;
      showImage(file);
      image = { uri };
      imageNote.textContent = `${file.name} · ${fmt(file.size / 1024, 1)} KiB`;
    } catch (error) {
      if (load !== imageLoad) return;
      clearImage();
      mount(imageNote, errorBox(error));
    }
  };
  const chooseSource = () => {
    const row = fromRow.checked;
    rowFields.hidden = !row;
    fileFields.hidden = row;
    if (row) loadRow();
    else loadFile();
  };
  fromRow.addEventListener("change", chooseSource);
  fromFile.addEventListener("change", chooseSource);
  datasetPicker.addEventListener("change", loadRow);
  rowInput.addEventListener("change", loadRow);
  rowInput.addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    event.preventDefault(); // Enter loads the row (it would otherwise submit the form with the old image)
    loadRow();
  });
  fileInput.addEventListener("change", loadFile);

  // Asking: both streams at once, each into its column; the judge once both have ended.
  let asking = null;
  signal.addEventListener("abort", () => asking?.abort());
  stop.addEventListener("click", () => asking?.abort());

  const judge = async (question, answered, run) => {
    marks.hidden = false;
    mount(
      marks,
      h(
        "p",
        { class: "muted" },
        "Objects the answers name, marked with the service's CHAIR matcher, run by the inference backend: ",
        h("mark", { class: "mention grounded" }, "in the image"),
        " ",
        h("mark", { class: "mention hallucinated" }, "not in the image"),
        ".",
      ),
      h("p", { class: "muted", id: "playground-judging" }, "judging..."),
    );
    try {
      const result = await api("/playground/judge", {
        method: "POST",
        json: { dataset_id: question.dataset_id, row: question.row, answers: answered.map((side) => columns[side].text) },
        signal: run.signal,
      });
      marks.querySelector("#playground-judging").replaceWith(h("p", { id: "playground-objects" }, h("b", null, "objects in the image: "), (result.objects || []).join(", ") || "none"));
      answered.forEach((side, i) => {
        const judgement = result.judgements[i];
        const col = columns[side];
        col.answer.replaceChildren(...markedAnswer(col.text, judgement));
        col.below.replaceChildren(judgementLines(judgement));
      });
      marks.dataset.state = "done";
    } catch (error) {
      if (error.name === "AbortError") return;
      marks.querySelector("#playground-judging").replaceWith(errorBox(error));
      marks.dataset.state = "error";
    }
  };

  const askBoth = async () => {
    asking?.abort();
    const run = new AbortController();
    asking = run;
    const picked = Object.fromEntries(SIDES.map((side) => [side, pickers[side].value]));
    const question = image;
    const tokens = Number.parseInt(maxTokens.value, 10);
    message.replaceChildren();
    if (!question) return mount(message, errorBox(new Error("Choose the image first: a dataset row or a file.")));
    if (!prompt.value.trim()) return mount(message, errorBox(new Error("Write a prompt.")));
    if (!(tokens >= 1)) return mount(message, errorBox(new Error("max tokens: a whole number, 1 or more.")));
    const content = [{ type: "image_url", image_url: { url: question.uri } }, { type: "text", text: prompt.value }];
    const body = { messages: [{ role: "user", content }], temperature: 0, max_tokens: tokens };
    marks.hidden = true;
    marks.replaceChildren();
    delete marks.dataset.state;
    ask.disabled = true;
    stop.hidden = false;
    const outcomes = await Promise.all(
      SIDES.map(async (side) => {
        const col = columns[side];
        col.reset(picked[side]);
        col.text = "";
        const started = performance.now();
        try {
          const result = await streamChat(
            { ...body, model: picked[side] },
            (text) => {
              if (!col.text) col.state.textContent = "streaming...";
              col.text += text;
              col.answer.textContent = col.text;
            },
            run.signal,
          );
          const seconds = (performance.now() - started) / 1000;
          const used = result.usage ? `${result.usage.completion_tokens} tokens · ` : "";
          col.state.textContent = `${used}${fmt(seconds, 1)} s · ${result.finishReason || "done"}`;
          col.answer.dataset.state = "done";
          if (!col.text) col.answer.append(h("span", { class: "muted" }, "(an empty answer)"));
          return true;
        } catch (error) {
          col.answer.dataset.state = error.name === "AbortError" ? "stopped" : "error";
          col.state.textContent = error.name === "AbortError" ? "stopped" : "failed";
          if (error.name !== "AbortError") col.below.append(errorBox(error));
          return false;
        }
      }),
    );
    if (asking === run) {
      ask.disabled = false;
      stop.hidden = true;
    }
    const answered = SIDES.filter((side, i) => outcomes[i]);
    if (question?.dataset_id && answered.length && !run.signal.aborted) await judge(question, answered, run);
  };

  const form = h(
    "form",
    { class: "card", id: "playground-form" },
    h("div", { class: "fields" }, h("label", null, "Left model ", pickers.left), h("label", null, "Right model ", pickers.right)),
    h(
      "div",
      { class: "playground-question" },
      preview,
      h(
        "div",
        { class: "playground-inputs" },
        h(
          "div",
          { class: "toolbar" },
          h("b", null, "Image from"),
          h("label", null, fromRow, " a generative dataset's row"),
          h("label", null, fromFile, " a file"),
          rowFields,
          fileFields,
          sourceNote,
        ),
        imageNote,
        h("label", { for: "playground-prompt" }, "Prompt"),
        prompt,
        h(
          "div",
          { class: "toolbar" },
          h("label", null, "Max tokens ", maxTokens),
          ask,
          stop,
          h("span", { class: "muted" }, "temperature 0: the same question gives the same answer"),
        ),
        message,
      ),
    ),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    askBoth();
  });

  mount(
    view,
    h("h1", null, "Playground"),
    h(
      "p",
      { class: "muted" },
      "Put one question to two models (a base and a tuned job, or two jobs) and read their answers side by side, " +
        "streamed from POST /v1/chat/completions as they are generated.",
    ),
    form,
    marks,
    h("div", { class: "playground-columns", id: "playground-columns" }, SIDES.map((side) => columns[side].element)),
  );
  const initialRow = Number.parseInt(query.get("row") || "", 10);
  if (query.get("dataset") && datasets.some((d) => d.id === query.get("dataset"))) datasetPicker.value = query.get("dataset");
  if (initialRow >= 1) rowInput.value = String(initialRow);
  if (datasets.length) fromRow.checked = true;
  else {
    fromFile.checked = true;
    fromRow.disabled = true;
    sourceNote.textContent = "No generative dataset yet: upload one (format generative) to judge answers against its objects.";
  }
  chooseSource();
}
