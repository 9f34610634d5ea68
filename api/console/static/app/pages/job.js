// A job: live status (events streamed with fetch + the Authorization header), training curves, held-out
// evaluation points, the base-vs-tuned evaluation, checkpoints, cancel and the adapter download.

import { api, download, followEvents } from "../api.js";
import { lineChart } from "../charts.js";
import { duration, errorBox, fmt, h, mount, statusBadge, table, when } from "../dom.js";
import { progressCell } from "./jobs.js";

export const ENDED = new Set(["succeeded", "failed", "cancelled"]);
export const METRIC_KEYS = [
  "loss",
  "reward_margin",
  "reward_accuracy",
  "beta_mean",
  "beta_min",
  "beta_max",
  "alpha_d_mean",
  "alpha_m",
  "kept",
  "eval_loss",
  "eval_accuracy",
  "eval_margin",
  "eval_logp_accuracy",
  "eval_logp_margin",
];

/** The implicit reward (policy against reference) is 0 by construction before the first step: a preference run's
 * held-out point at step 0 is left out (an sft run has no reference; its held-out figures are its own). */
function afterStart(points, spec) {
  return spec.method === "sft" ? points : points.filter(([step]) => step > 0);
}

/** Pairs seen per optimizer step, to turn the kept count into a share. */
function pairsPerStep(spec) {
  return spec.hyperparameters.batch_size * spec.hyperparameters.grad_accumulation * (spec.gpus || 1);
}

export function keptShare(series, spec) {
  const total = pairsPerStep(spec);
  return (series.kept || []).map(([step, kept]) => [step, Math.min(1, kept / total)]);
}

function betaBand(series) {
  const low = new Map(series.beta_min || []);
  const high = new Map(series.beta_max || []);
  return (series.beta_mean || []).filter(([step]) => low.has(step) && high.has(step)).map(([step]) => [step, low.get(step), high.get(step)]);
}

export function trainingCharts(series, spec) {
  const s = (key) => series[key] || [];
  return [
    lineChart({ title: "loss", series: [{ label: "loss", points: s("loss") }, { label: "held-out loss", points: s("eval_loss"), dots: true, color: 1 }] }),
    lineChart({ title: "reward margin", series: [{ label: "train", points: s("reward_margin") }, { label: "held-out", points: afterStart(s("eval_margin"), spec), dots: true, color: 1 }] }),
    lineChart({
      title: "preference accuracy",
      series: [
        { label: "train", points: s("reward_accuracy") },
        { label: "held-out, implicit reward", points: afterStart(s("eval_accuracy"), spec), dots: true, color: 1 },
        { label: "held-out, log-prob (chosen likelier)", points: s("eval_logp_accuracy"), dots: true, color: 2 },
      ],
    }),
    lineChart({ title: "beta: mean, min-max band", series: [{ label: "beta mean", points: s("beta_mean"), band: betaBand(series) }] }),
    lineChart({ title: "alpha_D and alpha_M", series: [{ label: "alpha_D (mean)", points: s("alpha_d_mean") }, { label: "alpha_M", points: s("alpha_m") }] }),
    lineChart({ title: "kept share", series: [{ label: "kept", points: keptShare(series, spec) }] }),
  ];
}

function heldOutTable(series, spec) {
  const steps = (series.eval_accuracy || []).map(([step]) => step);
  if (!steps.length) return h("p", { class: "muted" }, "No held-out evaluation (set evaluation.dataset_id or holdout_fraction).");
  const at = (key) => new Map(series[key] || []);
  const [loss, logp] = [at("eval_loss"), at("eval_logp_accuracy")];
  // The implicit reward is 0 by construction before the first step (policy = reference): no figure, not a 0.
  const [accuracy, margin] = [new Map(afterStart(series.eval_accuracy || [], spec)), new Map(afterStart(series.eval_margin || [], spec))];
  return table(
    [
      { label: "step", value: (step) => String(step), class: "num" },
      { label: "loss", value: (step) => fmt(loss.get(step)), class: "num" },
      { label: "implicit-reward accuracy", value: (step) => fmt(accuracy.get(step)), class: "num" },
      { label: "implicit-reward margin", value: (step) => fmt(margin.get(step)), class: "num" },
      { label: "log-prob accuracy", value: (step) => fmt(logp.get(step)), class: "num" },
    ],
    steps,
    { id: "held-out" },
  );
}

/** Base against tuned, from result.evaluation (preference per hardness bucket; CHAIR on a generative set). Tuned from
 * a starting adapter (init_adapter): "base" is base + that adapter, and the plain base gets a column of its own. */
export function evaluationTables(evaluation) {
  if (!evaluation) return h("p", { class: "muted" }, "Not evaluated yet.");
  const parts = [];
  const base = evaluation.init_adapter ? "base + starting adapter" : "base";
  const preference = evaluation.preference;
  if (preference && preference.base) {
    // easy, medium, hard: the stored results' key order is not kept (Postgres jsonb orders keys by length).
    const order = (name) => ({ easy: 0, medium: 1, hard: 2 })[name] ?? 3;
    const buckets = ["overall", ...Object.keys(preference.base.buckets || {}).sort((a, b) => order(a) - order(b))];
    const pick = (model, bucket) => (bucket === "overall" ? preference[model]?.overall : preference[model]?.buckets?.[bucket]) || {};
    const reward = (bucket) => (bucket === "overall" ? preference.implicit_reward?.overall : preference.implicit_reward?.buckets?.[bucket]) || {};
    parts.push(
      h("h3", null, `Held-out pairs: ${preference.pairs}`),
      table(
        [
          { label: "hardness", value: (b) => b },
          { label: "pairs", value: (b) => String(pick("base", b).count ?? "-"), class: "num" },
          ...(preference.plain_base
            ? [{ label: "plain base log-prob accuracy", value: (b) => fmt(pick("plain_base", b).logp_accuracy), class: "num" }]
            : []),
          { label: `${base} log-prob accuracy`, value: (b) => fmt(pick("base", b).logp_accuracy), class: "num" },
          { label: "tuned log-prob accuracy", value: (b) => fmt(pick("tuned", b).logp_accuracy), class: "num" },
          { label: "implicit-reward accuracy", value: (b) => fmt(reward(b).accuracy), class: "num" },
          { label: "reward margin", value: (b) => fmt(reward(b).margin), class: "num" },
          { label: "DPO loss", value: (b) => fmt(reward(b).loss), class: "num" },
        ],
        buckets,
        { class: "base-vs-tuned" },
      ),
    );
  }
  const generative = evaluation.generative;
  if (generative && generative.base) {
    const metrics = ["chair_s", "chair_i", "coverage", "mean_length"]; // hallucination_rate is chair_s again
    parts.push(
      h("h3", null, `Generative set (CHAIR): ${generative.samples ?? ""} samples`),
      table(
        [
          { label: "metric", value: (m) => m },
          ...(generative.plain_base ? [{ label: "plain base", value: (m) => fmt(generative.plain_base[m]), class: "num" }] : []),
          { label: base, value: (m) => fmt(generative.base[m]), class: "num" },
          { label: "tuned", value: (m) => fmt(generative.tuned?.[m]), class: "num" },
        ],
        metrics,
        { class: "chair" },
      ),
    );
  }
  return parts.length ? parts : h("p", { class: "muted" }, "No evaluation results.");
}

/** A failed job's error: its kind, then the message with its line breaks kept (a traceback reads as one). */
export function errorDetails(error) {
  return h("div", { class: "error", id: "job-error" }, h("strong", null, `${error.kind}:`), h("pre", { class: "error-message" }, error.message));
}

function header(job) {
  return [
    h("h1", null, "Job ", h("code", null, job.id), " ", statusBadge(job.status)),
    h(
      "dl",
      { class: "facts" },
      h("dt", null, "stage"), h("dd", { id: "job-stage" }, job.stage || "-"),
      h("dt", null, "progress"), h("dd", { id: "job-progress", dataset: { percent: String(job.percent) } }, progressCell(job)),
      h("dt", null, "step"), h("dd", null, `${job.step} / ${job.total_steps ?? "?"}`),
      h("dt", null, "ETA"), h("dd", null, ENDED.has(job.status) ? "-" : duration(job.eta_seconds)),
      h("dt", null, "method"), h("dd", null, job.spec.method),
      h("dt", null, "model"), h("dd", null, job.spec.model),
      h("dt", null, "dataset"), h("dd", null, job.dataset_id ? h("a", { href: `#/datasets/${job.dataset_id}` }, job.dataset_id) : "-"),
      h("dt", null, "created"), h("dd", null, when(job.created_at)),
      h("dt", null, "finished"), h("dd", null, when(job.finished_at)),
    ),
    job.error ? errorDetails(job.error) : null,
  ];
}

export async function jobPage(view, { id, signal }) {
  const top = h("section", { id: "job-header" });
  const actions = h("div", { class: "toolbar", id: "job-actions" });
  const charts = h("section", { class: "charts", id: "charts" });
  const heldOut = h("section", { class: "card" }, h("h2", null, "Held-out evaluation"));
  const baseVsTuned = h("section", { class: "card", id: "base-vs-tuned" }, h("h2", null, "Base vs tuned"));
  const checkpoints = h("section", { class: "card" }, h("h2", null, "Checkpoints"));
  const log = h("ol", { class: "events", id: "events" });
  const actionMessage = h("div", { id: "action-message" });
  mount(
    view,
    top,
    actions,
    actionMessage,
    h("h2", null, "Training"),
    charts,
    heldOut,
    baseVsTuned,
    checkpoints,
    h("section", { class: "card" }, h("h2", null, "Events"), log),
  );

  let job = null;
  const refresh = async () => {
    const [fresh, metrics, saved] = await Promise.all([
      api(`/jobs/${id}`, { signal }),
      api(`/jobs/${id}/metrics`, { query: { keys: METRIC_KEYS.join(",") }, signal }),
      api(`/jobs/${id}/checkpoints`, { query: { limit: 100 }, signal }),
    ]);
    job = fresh;
    mount(top, header(job));
    mount(
      actions,
      ENDED.has(job.status) ? null : h("button", { type: "button", id: "cancel-job", onclick: cancel }, "Cancel"),
      job.status === "succeeded" ? h("button", { type: "button", id: "download-adapter", onclick: downloadAdapter }, "Download adapter") : null,
      h("a", { class: "button", href: `#/compare?ids=${job.id}` }, "Compare..."),
    );
    mount(charts, trainingCharts(metrics.series, job.spec));
    mount(heldOut, h("h2", null, "Held-out evaluation"), heldOutTable(metrics.series, job.spec));
    mount(baseVsTuned, h("h2", null, "Base vs tuned"), evaluationTables(job.result?.evaluation));
    mount(
      checkpoints,
      h("h2", null, "Checkpoints"),
      saved.data.length
        ? table(
            [
              { label: "step", value: (c) => String(c.step), class: "num" },
              { label: "id", value: (c) => h("code", null, c.id) },
              { label: "saved", value: (c) => when(c.created_at) },
            ],
            saved.data,
          )
        : h("p", { class: "muted", id: "no-checkpoints" }, ENDED.has(job.status) ? "None kept." : "None yet."),
    );
  };
  async function cancel() {
    try {
      await api(`/jobs/${id}/cancel`, { method: "POST", signal });
      await refresh();
    } catch (error) {
      mount(actionMessage, errorBox(error));
    }
  }
  async function downloadAdapter() {
    try {
      const saved = await download(`/jobs/${id}/adapter`, `${id}-adapter.tar.gz`);
      mount(actionMessage, h("div", { class: "ok", id: "download-done" }, `Downloaded ${saved.name} (${saved.size} bytes, sha256 ${saved.sha256})`));
    } catch (error) {
      mount(actionMessage, errorBox(error));
    }
  }

  await refresh();
  // Events arrive as they happen; metrics (written every step, without events) are polled while the job runs.
  const stream = followEvents(
    `/jobs/${id}/events`,
    (event) => {
      log.append(
        h(
          "li",
          { class: `event event-${event.type}` },
          h("time", null, new Date(event.created_at).toLocaleTimeString()),
          " ",
          h("span", { class: "event-type" }, event.type),
          " ",
          // "stage validating" under the type "stage" reads "stage stage validating": say the type once.
          event.message.startsWith(`${event.type} `) ? event.message.slice(event.type.length + 1) : event.message,
        ),
      );
    },
    { signal },
  ).catch((error) => {
    if (error.name !== "AbortError") log.append(h("li", { class: "error" }, error.message));
  });
  while (!signal.aborted && !ENDED.has(job.status)) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
    if (signal.aborted) break;
    try {
      await refresh();
    } catch (error) {
      // a blip (rate limit, restart): say so and keep following; a vanished job or a refused key ends the view
      if (error.name === "AbortError" || error.status === 401 || error.status === 404) throw error;
      mount(actionMessage, errorBox(error));
    }
  }
  await stream;
  if (!signal.aborted) await refresh();
}
