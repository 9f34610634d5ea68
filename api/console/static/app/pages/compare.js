// Compare jobs: their curves on the same charts and their evaluations side by side (DPO against DAMA first).

import { api } from "../api.js";
import { groupedBars, lineChart } from "../charts.js";
import { fmt, h, mount, statusBadge, table } from "../dom.js";
import { keptShare, METRIC_KEYS } from "./job.js";

function label(job) {
  return `${job.spec.method} · ${job.id.slice(-6)}`;
}

async function picker(view, signal) {
  const page = await api("/jobs", { query: { limit: 100 }, signal });
  const boxes = page.data.map((job) => h("label", { class: "pick" }, h("input", { type: "checkbox", value: job.id }), ` ${label(job)} · ${job.spec.model} · ${job.status}`));
  const go = h("button", { type: "button", id: "compare-go" }, "Compare");
  go.addEventListener("click", () => {
    const ids = boxes.map((box) => box.querySelector("input")).filter((input) => input.checked).map((input) => input.value);
    if (ids.length) window.location.hash = `#/compare?ids=${ids.join(",")}`;
  });
  mount(view, h("h1", null, "Compare jobs"), h("p", { class: "muted" }, "Pick the jobs to put on the same charts."), h("div", { class: "picks" }, boxes), go);
}

export async function comparePage(view, { query, signal }) {
  const ids = (query.get("ids") || "").split(",").filter((id) => /^[\w-]+$/.test(id));
  if (!ids.length) return picker(view, signal);
  const loaded = await Promise.all(
    ids.map(async (id) => {
      const [job, metrics] = await Promise.all([
        api(`/jobs/${id}`, { signal }),
        api(`/jobs/${id}/metrics`, { query: { keys: METRIC_KEYS.join(",") }, signal }),
      ]);
      return { job, series: metrics.series };
    }),
  );
  const across = (title, pick, dots = false) =>
    lineChart({ title, series: loaded.map((item, i) => ({ label: label(item.job), points: pick(item), dots, color: i })) });
  const charts = h(
    "section",
    { class: "charts", id: "compare-charts" },
    across("loss", (item) => item.series.loss || []),
    across("reward margin", (item) => item.series.reward_margin || []),
    across("preference accuracy (train)", (item) => item.series.reward_accuracy || []),
    across("held-out log-prob accuracy", (item) => item.series.eval_logp_accuracy || [], true),
    across("beta mean", (item) => item.series.beta_mean || []),
    across("kept share", (item) => keptShare(item.series, item.job.spec)),
  );
  const reward = (item, bucket) => {
    const implicit = item.job.result?.evaluation?.preference?.implicit_reward;
    return bucket === "overall" ? implicit?.overall : implicit?.buckets?.[bucket];
  };
  const buckets = ["overall", "easy", "medium", "hard"];
  const summary = table(
    [
      { label: "job", value: (item) => h("a", { href: `#/jobs/${item.job.id}` }, label(item.job)) },
      { label: "status", value: (item) => statusBadge(item.job.status) },
      { label: "model", value: (item) => item.job.spec.model },
      { label: "held-out log-prob acc. before", value: (item) => fmt(item.job.result?.eval_before?.eval_logp_accuracy), class: "num" },
      { label: "held-out log-prob acc. after", value: (item) => fmt(item.job.result?.eval_after?.eval_logp_accuracy), class: "num" },
      ...buckets.map((bucket) => ({ label: `reward acc. ${bucket}`, value: (item) => fmt(reward(item, bucket)?.accuracy), class: "num" })),
      { label: "final loss", value: (item) => fmt(item.job.result?.train_metrics?.loss), class: "num" },
    ],
    loaded,
    { id: "compare-table" },
  );
  const bars = groupedBars({
    title: "implicit-reward accuracy per hardness bucket (held-out)",
    groups: buckets.map((bucket) => ({
      label: bucket,
      values: Object.fromEntries(loaded.map((item) => [label(item.job), reward(item, bucket)?.accuracy])),
    })),
    models: loaded.map((item) => label(item.job)),
  });
  mount(
    view,
    h("h1", null, `Compare ${loaded.length} jobs`),
    h("p", null, h("a", { href: "#/compare" }, "Pick other jobs")),
    charts,
    h("section", { class: "card" }, h("h2", null, "Evaluations"), summary, bars),
  );
}
