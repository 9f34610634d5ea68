// Pair generations: the list, and a page with the report (numbers and chart), the samples and a link to the
// preference dataset the run made.

import { api, fetchRaw, imageUrl } from "../api.js";
import { duration, fmt, h, mount, statusBadge, table, when } from "../dom.js";
import { progressCell } from "./jobs.js";
import { ENDED, errorDetails } from "./job.js";
import { followRunPage } from "./run.js";

const datasetLink = (id) => (id ? h("a", { href: `#/datasets/${id}` }, id) : "-");
const listed = (values) => (values && values.length ? values.join(", ") : "-");

export async function pairGenerationsPage(view, { signal }) {
  const page = await api("/pair-generations", { query: { limit: 100 }, signal });
  mount(
    view,
    h("h1", null, "Pair generations"),
    h(
      "p",
      { class: "muted" },
      "Answers sampled from a model on a generative set, judged against each image's objects, paired into a " +
        "preference dataset. Created with POST /pair-generations or `dama pairs generate`.",
    ),
    page.data.length
      ? table(
          [
            { label: "run", value: (p) => h("a", { href: `#/pair-generations/${p.id}` }, p.id) },
            { label: "status", value: (p) => statusBadge(p.status) },
            { label: "stage", value: (p) => p.stage || "-" },
            { label: "progress", value: progressCell },
            { label: "model", value: (p) => p.spec.model },
            { label: "pairs", value: (p) => (p.report ? `${p.report.pairs} of ${p.report.prompts_tried}` : "-"), class: "num" },
            { label: "dataset", value: (p) => datasetLink(p.dataset_id) },
            { label: "created", value: (p) => when(p.created_at) },
          ],
          page.data,
          { id: "pair-generations-table" },
        )
      : h("p", { class: "muted" }, "No pair generations yet."),
  );
}

/** The report's counts as a two-column table, and its most common hallucinated objects. */
function reportTables(report) {
  if (!report) return h("p", { class: "muted" }, "No report.");
  const counts = [
    ["prompts tried", report.prompts_tried],
    ["pairs made", report.pairs],
    ["samples", report.samples],
    ["faithful samples", report.faithful_samples],
    ["hallucinating samples", report.hallucinating_samples],
    ["empty samples", report.empty_samples],
    ["prompts without a faithful sample", report.prompts_without_faithful_sample],
    ["prompts without a hallucinating sample", report.prompts_without_hallucinating_sample],
    ["mean chosen score", fmt(report.mean_chosen_score)],
    ["mean rejected score", fmt(report.mean_rejected_score)],
    // A prompt set's judge: what it listed, and the names no vocabulary entry matched.
    ...(report.judge
      ? [
          ["judge", report.judge.name || report.judge.model],
          ["images the judge listed", report.judge.images - report.judge.failed_images],
          ["images the judge failed on", report.judge.failed_images],
          ["prompts skipped", report.judge.prompts_skipped],
          ["objects per image", fmt(report.judge.objects_per_image)],
          ["names matching no vocabulary entry", report.judge.names_unmatched],
        ]
      : []),
  ].filter(([, value]) => value !== undefined);
  const common = report.most_common_hallucinated_objects || [];
  return [
    table(
      [
        { label: "measure", value: (row) => row[0] },
        { label: "value", value: (row) => String(row[1] ?? "-"), class: "num" },
      ],
      counts,
      { id: "pair-report" },
    ),
    h("h3", null, "Most common hallucinated objects"),
    common.length
      ? table(
          [
            { label: "object", value: (row) => row.object },
            { label: "samples naming it", value: (row) => String(row.samples), class: "num" },
          ],
          common,
        )
      : h("p", { class: "muted" }, "None."),
  ];
}

async function samples(id, signal) {
  let rows;
  try {
    const text = await (await fetchRaw(`/pair-generations/${id}/outputs?file=samples`, { signal })).text();
    rows = text.split("\n").filter((line) => line.trim()).slice(0, 50).map((line) => JSON.parse(line));
  } catch (error) {
    if (error.name === "AbortError") throw error;
    return h("p", { class: "muted" }, `The samples could not be shown: ${error.message || error}`);
  }
  return table(
    [
      { label: "prompt", value: (r) => r.prompt_id },
      { label: "sample", value: (r) => String(r.sample), class: "num" },
      { label: "answer", value: (r) => r.response },
      { label: "objects", value: (r) => listed(r.objects) },
      { label: "hallucinated", value: (r) => listed(r.hallucinated) },
      { label: "score", value: (r) => fmt(r.score), class: "num" },
      { label: "role", value: (r) => r.role || "-" },
    ],
    rows,
    { class: "outputs", id: "pair-samples" },
  );
}

export async function pairGenerationPage(view, { id, signal }) {
  const draw = async (body, urls) => {
    const run = await api(`/pair-generations/${id}`, { signal });
    const spec = run.spec;
    const parts = [
      h("h1", null, "Pair generation ", h("code", null, run.id), " ", statusBadge(run.status)),
      h(
        "dl",
        { class: "facts" },
        h("dt", null, "stage"), h("dd", null, run.stage || "-"),
        h("dt", null, "progress"), h("dd", null, progressCell(run)),
        h("dt", null, "ETA"), h("dd", null, ENDED.has(run.status) ? "-" : duration(run.eta_seconds)),
        h("dt", null, "model"), h("dd", null, spec.model + (spec.init_adapter ? ` + ${spec.init_adapter}` : "")),
        h("dt", null, "generative set"), h("dd", null, datasetLink(spec.generative_dataset_id)),
        h("dt", null, "sampling"),
        h("dd", null, `${spec.samples_per_prompt} per prompt, temperature ${spec.temperature}, seed ${spec.seed}`),
        h("dt", null, "pairs dataset"), h("dd", { id: "pairs-dataset" }, datasetLink(run.dataset_id)),
      ),
      run.error ? errorDetails(run.error) : null,
    ];
    if (run.status === "succeeded") {
      const chart = h("img", { alt: "pair generation report chart", class: "chart-png" });
      imageUrl(`/pair-generations/${id}/outputs?file=chart`, { signal }).then((url) => {
        urls.push(url);
        chart.src = url;
      }).catch(() => chart.remove());
      parts.push(
        h("section", { class: "card", id: "pair-generation-report" }, h("h2", null, "Report"), reportTables(run.report), chart),
        h("section", { class: "card" }, h("h2", null, "Samples (first 50)"), await samples(id, signal)),
      );
    }
    mount(body, parts);
    return run;
  };
  await followRunPage(view, { signal, eventsPath: `/pair-generations/${id}/events`, draw });
}
