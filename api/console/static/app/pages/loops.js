// Loops: the list, and a loop's page: its rounds as a table (each round's runs linked, its pairs and held-out
// figures), a chart of CHAIR_i, coverage and POPE F1 per round (round 0 is the base), and its events.

import { api } from "../api.js";
import { lineChart } from "../charts.js";
import { fmt, h, mount, statusBadge, table, when } from "../dom.js";
import { progressCell } from "./jobs.js";
import { errorDetails } from "./job.js";
import { followRunPage } from "./run.js";

const ROUTES = { pair_generation: "pair-generations", job: "jobs", evaluation: "evaluations" };
const FIGURES = [
  ["CHAIR_i", "chair_i"],
  ["CHAIR_s", "chair_s"],
  ["coverage", "coverage"],
  ["POPE F1", "pope_f1"],
];
const CHARTED = [["CHAIR_i", "chair_i"], ["coverage", "coverage"], ["POPE F1", "pope_f1"]];

/** A round's run as a link to its own page, with its status (and progress while it runs). */
function runCell(run) {
  if (!run) return "-";
  const link = h("a", { href: `#/${ROUTES[run.object]}/${run.id}` }, run.id);
  const running = run.status === "running" || run.status === "queued" || run.status === "cancelling";
  return h("span", null, link, " ", statusBadge(run.status), running ? ` ${fmt(run.percent, 0)}%` : "");
}

export async function loopsPage(view, { signal }) {
  const page = await api("/loops", { query: { limit: 100 }, signal });
  mount(
    view,
    h("h1", null, "Loops"),
    h(
      "p",
      { class: "muted" },
      "Rounds on the server: each round samples pairs from the previous round's tuned model, trains it further on " +
        "them and evaluates it on held-out scenes. Created with POST /loops or `dama loops create`.",
    ),
    page.data.length
      ? table(
          [
            { label: "loop", value: (l) => h("a", { href: `#/loops/${l.id}` }, l.id) },
            { label: "status", value: (l) => statusBadge(l.status) },
            { label: "stage", value: (l) => l.stage || "-" },
            { label: "progress", value: progressCell },
            { label: "model", value: (l) => l.spec.model },
            { label: "rounds", value: (l) => `${l.rounds.filter((r) => r.metrics).length} of ${l.spec.rounds}`, class: "num" },
            { label: "created", value: (l) => when(l.created_at) },
          ],
          page.data,
          { id: "loops-table" },
        )
      : h("p", { class: "muted" }, "No loops yet."),
  );
}

function roundsTable(loop) {
  const base = { round: 0, status: "base", pairs: null, metrics: loop.base };
  const rows = loop.base ? [base, ...loop.rounds] : loop.rounds;
  return table(
    [
      { label: "round", value: (r) => (r.round === 0 ? "base" : String(r.round)), class: "num" },
      { label: "status", value: (r) => (r.round === 0 ? "-" : statusBadge(r.status)) },
      { label: "pairs", value: (r) => (r.round === 0 ? "-" : runCell(r.pair_generation)) },
      { label: "pairs made", value: (r) => (r.pairs ?? "-").toString(), class: "num" },
      { label: "training job", value: (r) => (r.round === 0 ? "-" : runCell(r.job)) },
      { label: "evaluation", value: (r) => (r.round === 0 ? "-" : runCell(r.evaluation)) },
      ...FIGURES.map(([label, key]) => ({ label, value: (r) => fmt(r.metrics?.[key]), class: "num" })),
    ],
    rows,
    { id: "loop-rounds" },
  );
}

/** CHAIR_i, coverage and POPE F1 per round (round 0: the plain model), each measure that has values. */
function roundsChart(loop) {
  const measured = [
    ...(loop.base ? [[0, loop.base]] : []),
    ...loop.rounds.filter((r) => r.metrics).map((r) => [r.round, r.metrics]),
  ];
  const series = CHARTED.map(([label, key], color) => ({
    label,
    color,
    points: measured.filter(([, m]) => typeof m[key] === "number").map(([round, m]) => [round, m[key]]),
  })).filter((item) => item.points.length);
  if (!series.length) return h("p", { class: "muted" }, "No round evaluated yet.");
  return lineChart({ title: "Held-out figures per round (0: the base)", series, xLabel: "round" });
}

export async function loopPage(view, { id, signal }) {
  const draw = async (body) => {
    const loop = await api(`/loops/${id}`, { signal });
    const spec = loop.spec;
    mount(
      body,
      h("h1", null, "Loop ", h("code", null, loop.id), " ", statusBadge(loop.status)),
      h(
        "dl",
        { class: "facts" },
        h("dt", null, "stage"), h("dd", null, loop.stage || "-"),
        h("dt", null, "progress"), h("dd", null, progressCell(loop)),
        h("dt", null, "model"), h("dd", null, spec.model + (spec.init_adapter ? ` + ${spec.init_adapter}` : "")),
        h("dt", null, "sampled set"),
        h("dd", null, h("a", { href: `#/datasets/${spec.generative_dataset_id}` }, spec.generative_dataset_id)),
        h("dt", null, "held-out set"),
        h("dd", null, h("a", { href: `#/datasets/${spec.held_out_dataset_id}` }, spec.held_out_dataset_id)),
        h("dt", null, "each round"),
        h(
          "dd",
          null,
          `${spec.sampling.samples_per_prompt} samples per prompt; ${spec.training.method}, ` +
            `${spec.training.hyperparameters.max_steps ?? "all"} steps; evaluated on ` +
            `${spec.evaluation.max_samples ?? "all"} held-out scenes`,
        ),
      ),
      loop.error ? errorDetails(loop.error) : null,
      h("section", { class: "card", id: "loop-rounds-card" }, h("h2", null, "Rounds"), roundsTable(loop)),
      h("section", { class: "card", id: "loop-chart" }, roundsChart(loop)),
    );
    return loop;
  };
  await followRunPage(view, { signal, eventsPath: `/loops/${id}/events`, draw });
}
