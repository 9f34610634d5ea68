// Evaluations: the list, and a page with the metrics, the chart (PNG fetched with the key) and per-sample outputs.

import { api, fetchRaw, imageUrl } from "../api.js";
import { duration, fmt, h, mount, statusBadge, table, when } from "../dom.js";
import { progressCell } from "./jobs.js";
import { ENDED, errorDetails, evaluationTables } from "./job.js";
import { followRunPage } from "./run.js";

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

async function jsonLines(path, signal) {
  const text = await (await fetchRaw(path, { signal })).text();
  return text.split("\n").filter((line) => line.trim()).slice(0, 50).map((line) => JSON.parse(line));
}

const listed = (values) => (values && values.length ? values.join(", ") : "-");

/** Per-sample outputs: generations (answers with their hallucinated objects) and preference pairs (log-probs). */
async function outputs(evaluation, signal) {
  const parts = [];
  if (evaluation.spec.generative_dataset_id) {
    const rows = await jsonLines(`/evaluations/${evaluation.id}/outputs?file=generations`, signal);
    parts.push(
      h("h3", null, "Generations"),
      table(
        [
          { label: "sample", value: (r) => r.id },
          { label: "prompt", value: (r) => r.prompt },
          { label: "objects", value: (r) => listed(r.objects) },
          { label: "base answer", value: (r) => r.base?.response ?? "-" },
          { label: "base hallucinated", value: (r) => listed(r.base?.hallucinated) },
          { label: "tuned answer", value: (r) => r.tuned?.response ?? "-" },
          { label: "tuned hallucinated", value: (r) => listed(r.tuned?.hallucinated) },
        ],
        rows,
        { class: "outputs" },
      ),
    );
  }
  if (evaluation.spec.preference_dataset_id) {
    const rows = await jsonLines(`/evaluations/${evaluation.id}/outputs?file=pairs`, signal);
    const margin = (r, model) => r[`${model}_logp_chosen`] - r[`${model}_logp_rejected`];
    parts.push(
      h("h3", null, "Preference pairs"),
      table(
        [
          { label: "pair", value: (r) => r.id },
          { label: "bucket", value: (r) => r.bucket ?? "-" },
          { label: "hardness", value: (r) => fmt(r.hardness), class: "num" },
          { label: "base log-prob margin", value: (r) => fmt(margin(r, "base")), class: "num" },
          { label: "tuned log-prob margin", value: (r) => fmt(margin(r, "tuned")), class: "num" },
          { label: "reward margin", value: (r) => fmt(r.reward_margin), class: "num" },
        ],
        rows,
        { class: "outputs" },
      ),
    );
  }
  return parts.length ? parts : h("p", { class: "muted" }, "No per-sample outputs.");
}

export async function evaluationPage(view, { id, signal }) {
  const draw = async (body, urls) => {
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
        h("dt", null, "adapter of"),
        h("dd", null, evaluation.spec.adapter_job_id ? h("a", { href: `#/jobs/${evaluation.spec.adapter_job_id}` }, evaluation.spec.adapter_job_id) : "-"),
      ),
      evaluation.error ? errorDetails(evaluation.error) : null,
    ];
    if (evaluation.status === "succeeded") {
      const chart = h("img", { alt: "evaluation chart", class: "chart-png" });
      imageUrl(`/evaluations/${id}/chart`, { signal }).then((url) => {
        urls.push(url);
        chart.src = url;
      }).catch(() => chart.remove());
      parts.push(
        h("section", { class: "card", id: "evaluation-metrics" }, h("h2", null, "Metrics"), evaluationTables(evaluation.metrics)),
        h("section", { class: "card" }, h("h2", null, "Chart"), chart),
        h("section", { class: "card", id: "evaluation-outputs" }, h("h2", null, "Per-sample outputs (first 50)"), await outputs(evaluation, signal)),
      );
    }
    mount(body, parts);
    return evaluation;
  };
  await followRunPage(view, { signal, eventsPath: `/evaluations/${id}/events`, draw });
}
