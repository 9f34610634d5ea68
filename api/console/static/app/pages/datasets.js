// Datasets: the list with an upload form (with progress), and a dataset page with its validation report,
// hardness histogram and sample rows (images fetched with the key, shown as blob: URLs).

import { api, imageUrl, uploadDataset } from "../api.js";
import { barChart } from "../charts.js";
import { bytes, errorBox, fmt, h, mount, table, when } from "../dom.js";

function reportTable(errors) {
  return table(
    [
      { label: "row", value: (e) => String(e.row ?? "-"), class: "num" },
      { label: "field", value: (e) => e.field ?? e.param ?? "-" },
      { label: "code", value: (e) => e.code ?? "-" },
      { label: "problem", value: (e) => e.reason ?? e.message ?? "" },
    ],
    errors,
    { class: "report" },
  );
}

function uploadForm(onDone) {
  const file = h("input", { type: "file", id: "upload-file", name: "file", required: true });
  const name = h("input", { type: "text", id: "upload-name", name: "name", placeholder: "default: the file name" });
  const format = h(
    "select",
    { id: "upload-format", name: "format" },
    ["auto", "trl", "rlaif_v", "openai", "generative", "prompts"].map((value) => h("option", { value }, value)),
  );
  const progress = h("progress", { id: "upload-progress", max: 1, value: 0, hidden: true });
  const result = h("div", { id: "upload-result" });
  const submit = h("button", { type: "submit" }, "Upload");
  const form = h(
    "form",
    { class: "card", id: "upload-form" },
    h("h2", null, "Upload a dataset"),
    h("p", { class: "muted" }, "A .jsonl / .json / .parquet file, or a .zip / .tar.gz archive with its images."),
    h("div", { class: "fields" }, h("label", null, "File ", file), h("label", null, "Name ", name), h("label", null, "Format ", format)),
    submit,
    progress,
    result,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!file.files.length) return;
    submit.disabled = true;
    progress.hidden = false;
    progress.value = 0;
    mount(result, h("span", { class: "muted" }, "uploading..."));
    try {
      const dataset = await uploadDataset(file.files[0], {
        name: name.value.trim(),
        format: format.value,
        onProgress: (share) => {
          progress.value = share;
          if (share >= 1) mount(result, h("span", { class: "muted" }, "checking every row..."));
        },
      });
      mount(result, h("span", { class: "ok" }, "Stored ", h("a", { href: `#/datasets/${dataset.id}` }, dataset.name), ` (${dataset.row_count} rows)`));
      onDone(dataset);
    } catch (error) {
      mount(result, errorBox(error), error.errors ? reportTable(error.errors) : null);
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

export async function datasetsPage(view, { signal }) {
  const list = h("div", { id: "datasets" });
  const load = async () => {
    const page = await api("/datasets", { query: { limit: 100 }, signal });
    mount(
      list,
      page.data.length
        ? table(
            [
              { label: "name", value: (d) => h("a", { href: `#/datasets/${d.id}` }, d.name) },
              { label: "id", value: (d) => h("code", null, d.id) },
              { label: "format", value: (d) => d.format },
              { label: "rows", value: (d) => String(d.row_count), class: "num" },
              { label: "images", value: (d) => String(d.image_count), class: "num" },
              { label: "size", value: (d) => bytes(d.size_bytes), class: "num" },
              { label: "uploaded", value: (d) => when(d.created_at) },
            ],
            page.data,
            { id: "datasets-table" },
          )
        : h("p", { class: "muted" }, "No datasets yet."),
    );
  };
  mount(view, h("h1", null, "Datasets"), uploadForm(load), list);
  await load();
}

function sampleRow(row, urls, signal) {
  const images = h("div", { class: "images" });
  for (const path of row.images) {
    if (!path) {
      images.append(h("span", { class: "muted" }, "(not a raster image)"));
      continue;
    }
    const img = h("img", { alt: `row ${row.row} image`, class: "thumb" });
    images.append(img);
    imageUrl(path, { signal })
      .then((url) => {
        urls.push(url);
        img.src = url;
      })
      .catch(() => img.replaceWith(h("span", { class: "muted" }, "(image unavailable)")));
  }
  const answers = row.chosen !== null && row.chosen !== undefined
    ? [h("div", { class: "chosen" }, h("b", null, "chosen: "), row.chosen), h("div", { class: "rejected" }, h("b", null, "rejected: "), row.rejected)]
    : [h("div", null, h("b", null, "objects: "), (row.objects || []).join(", "))];
  return h(
    "article",
    { class: "sample card", dataset: { row: String(row.row) } },
    images,
    h(
      "div",
      { class: "texts" },
      h("div", { class: "muted" }, `row ${row.row} · ${row.row_id}`, row.hardness !== null && row.hardness !== undefined ? ` · hardness ${fmt(row.hardness)}` : ""),
      h("div", { class: "prompt" }, h("b", null, "prompt: "), row.prompt),
      answers,
    ),
  );
}

export async function datasetPage(view, { id, signal }) {
  const urls = [];
  signal.addEventListener("abort", () => urls.forEach((url) => URL.revokeObjectURL(url)));
  const dataset = await api(`/datasets/${id}`, { signal });
  const report = dataset.validation;
  mount(
    view,
    h("h1", null, "Dataset ", h("span", { id: "dataset-name" }, dataset.name)),
    h(
      "dl",
      { class: "facts" },
      h("dt", null, "id"), h("dd", null, h("code", null, dataset.id)),
      h("dt", null, "format"), h("dd", { id: "dataset-format" }, dataset.format),
      h("dt", null, "rows"), h("dd", { id: "dataset-rows" }, String(dataset.row_count)),
      h("dt", null, "images"), h("dd", null, String(dataset.image_count)),
      h("dt", null, "size"), h("dd", null, bytes(dataset.size_bytes)),
      h("dt", null, "sha256"), h("dd", null, h("code", null, dataset.sha256)),
      h("dt", null, "uploaded"), h("dd", null, when(dataset.created_at)),
    ),
    h("p", null, h("a", { href: `#/jobs/new?dataset=${dataset.id}` }, "Start a job on this dataset")),
    h(
      "section",
      { class: "card", id: "validation" },
      h("h2", null, "Validation report"),
      h("p", null, `${report.valid_rows} of ${report.total_rows} rows valid`, report.ok ? " - every check passed." : "."),
      report.errors.length ? reportTable(report.errors) : null,
      report.errors_omitted ? h("p", { class: "muted" }, `${report.errors_omitted} more problems not listed`) : null,
    ),
  );
  const hardness = h("section", { class: "card", id: "hardness" }, h("h2", null, "Data hardness"), h("p", { class: "muted" }, "loading..."));
  const samples = h("section", { id: "samples" }, h("h2", null, "Sample rows"), h("p", { class: "muted" }, "loading..."));
  view.append(hardness, samples);
  const [histogram, rows] = await Promise.all([
    api(`/datasets/${id}/hardness`, { query: { bins: 12 }, signal }),
    api(`/datasets/${id}/rows`, { query: { limit: 12 }, signal }),
  ]);
  mount(
    hardness,
    h("h2", null, "Data hardness"),
    histogram.source
      ? [
          h("p", { class: "muted" }, `${histogram.count} rows · mean ${fmt(histogram.mean)} · min ${fmt(histogram.min)} · max ${fmt(histogram.max)}`),
          barChart({ title: "rows per hardness bin", bins: histogram.bins }),
        ]
      : h("p", { class: "muted" }, "The rows carry no hardness scores: a job scores the pairs with CLIP when it starts."),
  );
  const heading = h("h2", null);
  const list = h("div", null, rows.data.map((row) => sampleRow(row, urls, signal)));
  const more = h("button", { type: "button", id: "more-rows" }, "More rows");
  let shown = rows.data.length;
  const label = (page) => {
    heading.textContent = `Sample rows (${shown} of ${page.total_rows}; the first ${page.sampled_rows} can be shown)`;
    more.hidden = !page.has_more;
  };
  more.addEventListener("click", async () => {
    const page = await api(`/datasets/${id}/rows`, { query: { offset: shown, limit: 12 }, signal });
    list.append(...page.data.map((row) => sampleRow(row, urls, signal)));
    shown += page.data.length;
    label(page);
  });
  label(rows);
  mount(samples, heading, list, more);
}
