// Evaluations: the list, and a page with the metrics, the chart (PNG fetched with the key) and per-sample outputs.

import { api, fetchRaw, followEvents, imageUrl } from "../api.js";
import { duration, fmt, h, mount, statusBadge, table, when } from "../dom.js";
import { progressCell } from "./jobs.js";
import { ENDED, evaluationTables } from "./job.js";

export async function evaluationsPage(view, { signal }) {
  const page = await api("/evaluations", { query: { limit: 100 }, signal });
  mount(
    view,
    h("h1", null, "Evaluations"),
    h("p", { class: "muted" }, "Created with POST /evaluations (see the API docs)."),
    page.data.length
      ? table(
          [
            { label: "evaluation", value: (e) => h("a", { href: `#/evaluations/${e.id}` }, e.id) },
            { label: "status", value: (e) => statusBadge(e.status) },
            { label: "stage", value: (e) => e.stage || "-" },
            { label: "progress", value: progressCell },
            { label: "model", value: (e) => e.spec.model },
            { label: "adapter of", value: (e) => (e.spec.adapter_job_id ? h("a", { href: `#/jobs/${e.spec.adapter_job_id}` }, e.spec.adapter_job_id) : "-") },
            { label: "created", value: (e) => when(e.created_at) },
          ],
          page.data,
          { id: "evaluations-table" },
        )
      : h("p", { class: "muted" }, "No evaluations yet."),
  );
}

async function outputs(id, signal) {
  const lines = [];
  for (const file of ["generations", "pairs"]) {
    try {
      const text = await (await fetchRaw(`/evaluations/${id}/outputs?file=${file}`, { signal })).text();
      for (const line of text.split("\n").slice(0, 50)) if (line.trim()) lines.push({ file, row: JSON.parse(line) });
    } catch {
      // that kind of output was not asked for
    }
  }
  if (!lines.length) return h("p", { class: "muted" }, "No per-sample outputs.");
  const text = (value) => (typeof value === "string" ? value : JSON.stringify(value));
  return table(
    [
      { label: "set", value: (l) => l.file },
      { label: "sample", value: (l) => text(l.row.sample_id ?? l.row.row_id ?? l.row.id ?? "") },
      { label: "prompt", value: (l) => text(l.row.prompt ?? "") },
      { label: "base", value: (l) => text(l.row.base?.response ?? l.row.base_response ?? l.row.base ?? "") },
      { label: "tuned", value: (l) => text(l.row.tuned?.response ?? l.row.tuned_response ?? l.row.tuned ?? "") },
      { label: "details", value: (l) => h("code", null, text(l.row.hallucinated ?? l.row.margin ?? l.row.bucket ?? "")) },
    ],
    lines,
    { class: "outputs" },
  );
}

export async function evaluationPage(view, { id, signal }) {
  const urls = [];
  signal.addEventListener("abort", () => urls.forEach((url) => URL.revokeObjectURL(url)));
  const log = h("ol", { class: "events" });
  const body = h("div");
  mount(view, body, h("section", { class: "card" }, h("h2", null, "Events"), log));
  const draw = async () => {
    const evaluation = await api(`/evaluations/${id}`, { signal });
    const parts = [
      h("h1", null, "Evaluation ", h("code", null, evaluation.id), " ", statusBadge(evaluation.status)),
      h(
        "dl",
        { class: "facts" },
        h("dt", null, "stage"), h("dd", null, evaluation.stage || "-"),
        h("dt", null, "progress"), h("dd", null, progressCell(evaluation)),
        h("dt", null, "ETA"), h("dd", null, ENDED.has(evaluation.status) ? "-" : duration(evaluation.eta_seconds)),
        h("dt", null, "model"), h("dd", null, evaluation.spec.model),
        h("dt", null, "adapter of"), h("dd", null, evaluation.spec.adapter_job_id || "-"),
      ),
      evaluation.error ? h("div", { class: "error" }, `${evaluation.error.kind}: ${evaluation.error.message}`) : null,
    ];
    if (evaluation.status === "succeeded") {
      const chart = h("img", { alt: "evaluation chart", class: "chart-png" });
      imageUrl(`/evaluations/${id}/chart`, { signal }).then((url) => {
        urls.push(url);
        chart.src = url;
      }).catch(() => chart.remove());
      parts.push(
        h("section", { class: "card" }, h("h2", null, "Metrics"), evaluationTables(evaluation.metrics), h("p", null, "Preference pairs: ", fmt(evaluation.metrics?.preference?.pairs))),
        h("section", { class: "card" }, h("h2", null, "Chart"), chart),
        h("section", { class: "card" }, h("h2", null, "Per-sample outputs (first 50)"), await outputs(id, signal)),
      );
    }
    mount(body, parts);
    return evaluation;
  };
  let evaluation = await draw();
  const stream = followEvents(`/evaluations/${id}/events`, (event) => {
    log.append(h("li", null, h("span", { class: "event-type" }, event.type), " ", event.message));
  }, { signal }).catch(() => null);
  while (!signal.aborted && !ENDED.has(evaluation.status)) {
    await new Promise((resolve) => setTimeout(resolve, 1500));
    if (!signal.aborted) evaluation = await draw();
  }
  await stream;
}
