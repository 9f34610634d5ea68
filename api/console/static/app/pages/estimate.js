// The new-job form's estimate: what the job would take before it is started (POST /jobs/estimate, the form's own
// body; nothing is queued): peak memory per GPU and whether it fits the service's GPUs, time, steps, tokens, the
// other settings' peaks, and what to change when it does not fit.

import { api } from "../api.js";
import { duration, fmt, h, table } from "../dom.js";

const POLL_MS = 1000;
const ENDED = new Set(["succeeded", "failed"]);
// How the engine makes the peak of its parts (activations and gradients are never live at once): they do not add up.
const PEAK_RULE = "peak = weights + optimizer_state + gathered + max(activations, gradients)";

/** The estimate of a job body: asked for, then polled until a worker answered (after a 202). */
export async function requestEstimate(body, { signal, onWaiting } = {}) {
  let estimate = await api("/jobs/estimate", { method: "POST", json: body, signal });
  while (!ENDED.has(estimate.status)) {
    if (onWaiting) onWaiting(estimate);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    if (signal && signal.aborted) throw new DOMException("The page was left", "AbortError");
    estimate = await api(`/jobs/estimates/${encodeURIComponent(estimate.id)}`, { signal });
  }
  return estimate;
}

function fitsText(figures) {
  if (figures.fits === null || figures.fits === undefined) return "unknown (the service does not say how much memory its GPUs have)";
  return figures.fits ? `yes: one GPU has ${fmt(figures.gpu_memory_gib, 1)} GiB` : `no: one GPU has ${fmt(figures.gpu_memory_gib, 1)} GiB`;
}

function line(id, label, ...value) {
  return [h("dt", null, label), h("dd", { id }, ...value)];
}

/** An ended estimate as a card: the figures, the other settings' peaks, the advice; or why it failed. */
export function estimateView(estimate) {
  if (estimate.status !== "succeeded") {
    const reason = (estimate.error && estimate.error.message) || "no reason given";
    return h("div", { class: "error", role: "alert", id: "estimate-error" }, `The estimate failed: ${reason}`);
  }
  const figures = estimate.estimate;
  const memory = figures.memory;
  const parts = Object.entries(memory.parts_gib || {}).map(([name, gib]) => `${name} ${fmt(gib)} GiB`).join(", ");
  const setup = `${memory.strategy} on ${memory.world_size} GPU(s), batch_size ${memory.batch_size}, gradient checkpointing ${memory.gradient_checkpointing ? "on" : "off"}`;
  const time = figures.time ? `${duration(figures.time.seconds)} on ${figures.time.gpu_kind}` : "unknown (the service names no GPU kind)";
  const tokens = figures.tokens;
  const options = table(
    [
      { label: "strategy", value: (o) => o.strategy },
      { label: "gradient checkpointing", value: (o) => (o.gradient_checkpointing ? "on" : "off") },
      { label: "batch size", value: (o) => o.batch_size, class: "num" },
      { label: "GPUs", value: (o) => o.world_size, class: "num" },
      { label: "peak GiB per GPU", value: (o) => fmt(o.peak_gib), class: "num" },
      { label: "fits", value: (o) => (o.fits === null || o.fits === undefined ? "-" : o.fits ? "yes" : "no") },
    ],
    figures.options || [],
    { id: "estimate-options" },
  );
  const advice = figures.advice || [];
  return h(
    "div",
    { class: `estimate ${figures.fits === false ? "does-not-fit" : ""}` },
    h("h2", null, "Estimate ", h("span", { class: "muted" }, estimate.id)),
    h(
      "dl",
      null,
      line("estimate-peak", "Peak memory per GPU", `${fmt(memory.peak_gib)} GiB`, h("span", { class: "muted" }, ` (${setup})`)),
      line("estimate-parts", "Its parts", parts || "none given", h("span", { class: "muted" }, ` (${PEAK_RULE}; the CUDA context and the allocator's cache come on top)`)),
      line("estimate-fits", "Fits", fitsText(figures)),
      line("estimate-time", "Time", time),
      line("estimate-steps", "Steps", `${figures.steps} (${fmt(figures.epochs, 2)} epochs over ${figures.rows} rows)`),
      line("estimate-tokens", "Tokens", `${fmt(tokens.per_pair_mean, 1)} per pair on average, ${tokens.per_pair_max} at most, ${tokens.total} in all`),
    ),
    advice.length ? h("div", { id: "estimate-advice" }, h("p", null, "What to change:"), h("ul", null, advice.map((item) => h("li", null, item)))) : null,
    h("details", null, h("summary", null, "Peak memory under other settings"), options),
  );
}
