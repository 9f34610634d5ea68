// Jobs: the filterable list (refreshed while jobs run) and the create form, built from the OpenAPI document's
// JobSpec schema so every default and bound shown is the server's own; the server's field errors are placed on
// the fields they name. The form's Estimate button shows what the job would take before it is started.

import { api } from "../api.js";
import { duration, errorBox, h, mount, statusBadge, table, when } from "../dom.js";
import { estimateView, requestEstimate } from "./estimate.js";

const STATUSES = ["", "queued", "running", "cancelling", "succeeded", "failed", "cancelled"];
const METHODS = ["", "dpo", "beta_dpo", "dama_data", "dama_model", "dama"];
const ACTIVE = new Set(["queued", "running", "cancelling"]);

export function progressCell(job) {
  return h("span", { class: "progress-cell" }, h("progress", { max: 100, value: job.percent }), ` ${job.percent.toFixed(0)}%`);
}

export async function jobsPage(view, { query, signal }) {
  const status = h("select", { id: "filter-status" }, STATUSES.map((value) => h("option", { value }, value || "any status")));
  const method = h("select", { id: "filter-method" }, METHODS.map((value) => h("option", { value }, value || "any method")));
  const model = h("input", { id: "filter-model", type: "search", placeholder: "model contains" });
  status.value = query.get("status") || "";
  const compare = h("button", { type: "button", id: "compare-selected", disabled: true }, "Compare selected");
  const list = h("div", { id: "jobs" });
  const selected = new Set();
  let jobs = [];

  const draw = () => {
    const shown = jobs.filter(
      (job) => (!method.value || job.spec.method === method.value) && job.spec.model.includes(model.value.trim()),
    );
    mount(
      list,
      shown.length
        ? table(
            [
              {
                label: "",
                value: (job) => {
                  const box = h("input", { type: "checkbox", "aria-label": `select ${job.id}`, dataset: { job: job.id } });
                  box.checked = selected.has(job.id);
                  box.addEventListener("change", () => {
                    if (box.checked) selected.add(job.id);
                    else selected.delete(job.id);
                    compare.disabled = selected.size < 1;
                  });
                  return box;
                },
              },
              { label: "job", value: (job) => h("a", { href: `#/jobs/${job.id}` }, job.id) },
              { label: "status", value: (job) => statusBadge(job.status) },
              { label: "stage", value: (job) => job.stage || "-" },
              { label: "progress", value: progressCell },
              { label: "ETA", value: (job) => (ACTIVE.has(job.status) ? duration(job.eta_seconds) : "-") },
              { label: "method", value: (job) => job.spec.method },
              { label: "model", value: (job) => job.spec.model },
              { label: "created", value: (job) => when(job.created_at) },
            ],
            shown,
            { id: "jobs-table" },
          )
        : h("p", { class: "muted" }, "No jobs match."),
    );
  };
  const load = async () => {
    const page = await api("/jobs", { query: { limit: 100, status: status.value }, signal });
    jobs = page.data;
    draw();
    return jobs.some((job) => ACTIVE.has(job.status));
  };
  status.addEventListener("change", load);
  method.addEventListener("change", draw);
  model.addEventListener("input", draw);
  compare.addEventListener("click", () => {
    window.location.hash = `#/compare?ids=${[...selected].join(",")}`;
  });
  mount(
    view,
    h("h1", null, "Jobs"),
    h("div", { class: "toolbar" }, status, method, model, compare, h("a", { class: "button", href: "#/jobs/new" }, "New job")),
    list,
  );
  while (!signal.aborted) {
    const active = await load();
    await new Promise((resolve) => setTimeout(resolve, active ? 2000 : 10000));
  }
}

// ---- the create form ----------------------------------------------------------------------------------------

function resolve(schema, components) {
  if (!schema) return {};
  if (schema.$ref) return resolve(components[schema.$ref.split("/").pop()], components);
  if (schema.anyOf) {
    const concrete = schema.anyOf.filter((option) => option.type !== "null");
    const inner = resolve(concrete[0], components);
    return { ...inner, ...schema, anyOf: undefined, nullable: true, type: inner.type, properties: inner.properties };
  }
  return schema;
}

function bounds(schema) {
  const parts = [];
  if (schema.minimum !== undefined) parts.push(`>= ${schema.minimum}`);
  if (schema.exclusiveMinimum !== undefined) parts.push(`> ${schema.exclusiveMinimum}`);
  if (schema.maximum !== undefined) parts.push(`<= ${schema.maximum}`);
  if (schema.exclusiveMaximum !== undefined) parts.push(`< ${schema.exclusiveMaximum}`);
  if (schema.maxLength !== undefined) parts.push(`at most ${schema.maxLength} characters`);
  return parts.join(", ");
}

const DATASET_FIELDS = new Set(["dataset_id", "evaluation.dataset_id", "evaluation.generative_dataset_id"]);

function fieldInput(param, schema, ctx) {
  const id = `f-${param.replace(/[^\w]/g, "-")}`;
  const def = schema.default;
  let input;
  if (DATASET_FIELDS.has(param)) {
    // Generative sets (and prompt sets, which only pair generations take) are never training or held-out pairs.
    const wanted =
      param === "evaluation.generative_dataset_id"
        ? (d) => d.format === "generative"
        : (d) => d.format !== "generative" && d.format !== "prompts";
    input = h(
      "select",
      { id, name: param },
      h("option", { value: "" }, param === "dataset_id" ? "choose a dataset" : "none"),
      ctx.datasets.filter(wanted).map((d) => h("option", { value: d.id }, `${d.name} (${d.row_count} rows, ${d.id})`)),
    );
    if (param === "dataset_id" && ctx.preset) input.value = ctx.preset;
  } else if (schema.enum) {
    input = h("select", { id, name: param }, schema.enum.map((value) => h("option", { value }, value)));
    if (def !== undefined) input.value = def;
  } else if (schema.type === "boolean") {
    input = h("input", { id, name: param, type: "checkbox" });
    input.checked = Boolean(def);
  } else if (schema.type === "integer" || schema.type === "number") {
    input = h("input", {
      id,
      name: param,
      type: "number",
      step: schema.type === "integer" ? 1 : "any",
      min: schema.minimum,
      max: schema.maximum,
    });
    if (def !== undefined && def !== null) input.value = String(def);
  } else {
    input = h("input", { id, name: param, type: "text", maxlength: schema.maxLength, list: param === "model" ? "model-names" : null });
    if (schema.type === "array") input.placeholder = "comma-separated; empty: default";
    else if (def !== undefined && def !== null) input.value = String(def);
  }
  input.dataset.param = param;
  const hint = [];
  if (def !== undefined && def !== null) hint.push(`default ${JSON.stringify(def)}`);
  const range = bounds(schema);
  if (range) hint.push(range);
  return h(
    "div",
    { class: "field", dataset: { field: param } },
    h("label", { for: id }, schema.title || param.split(".").pop()),
    input,
    h("div", { class: "hint" }, [schema.description, hint.join("; ")].filter(Boolean).join(" · ")),
    h("div", { class: "field-error", role: "alert" }),
  );
}

function readValue(input, schema) {
  if (input.type === "checkbox") return input.checked;
  const raw = input.value.trim();
  if (raw === "") return undefined;
  if (schema.type === "integer") return Number.isInteger(Number(raw)) ? Number(raw) : raw;
  if (schema.type === "number") return Number.isNaN(Number(raw)) ? raw : Number(raw);
  if (schema.type === "array") return raw.split(",").map((item) => item.trim()).filter(Boolean);
  return raw;
}

/** The request body: required fields, and every other field only where it differs from its default. */
function collect(form, schema, components, prefix = "") {
  const body = {};
  for (const [name, raw] of Object.entries(schema.properties || {})) {
    const field = resolve(raw, components);
    const param = prefix + name;
    if (field.properties) {
      const nested = collect(form, field, components, `${param}.`);
      if (Object.keys(nested).length) body[name] = nested;
      continue;
    }
    const input = form.querySelector(`[data-param="${param}"]`);
    if (!input) continue;
    const value = readValue(input, field);
    const required = (schema.required || []).includes(name);
    if (value === undefined || (!required && JSON.stringify(value) === JSON.stringify(field.default))) continue;
    body[name] = value;
  }
  return body;
}

function showErrors(form, error) {
  for (const slot of form.querySelectorAll(".field-error")) slot.replaceChildren();
  for (const field of form.querySelectorAll(".field.invalid")) field.classList.remove("invalid");
  const problems = error.errors && error.errors.length ? error.errors : [{ param: error.param, message: error.message }];
  const unplaced = [];
  for (const problem of problems) {
    const field = problem.param ? form.querySelector(`.field[data-field="${CSS.escape(problem.param)}"]`) : null;
    if (field) {
      field.classList.add("invalid");
      field.querySelector(".field-error").append(problem.message || problem.reason || "invalid");
    } else {
      unplaced.push(problem);
    }
  }
  return unplaced;
}

export async function newJobPage(view, { query, signal }) {
  const [openapi, datasets, models] = await Promise.all([
    fetch("/openapi.json", { signal }).then((response) => response.json()),
    api("/datasets", { query: { limit: 100 }, signal }),
    api("/models", { signal }).catch(() => null),
  ]);
  const components = openapi.components.schemas;
  const spec = components.JobSpec;
  const ctx = { datasets: datasets.data, preset: query.get("dataset") };
  const form = h("form", { id: "job-form", class: "card", novalidate: true });
  // Model suggestions: the built-in tiny models, and any name may be typed.
  const names = new Set((models?.tiny_models || []).map((model) => model.name));
  form.append(h("datalist", { id: "model-names" }, [...names].map((value) => h("option", { value }))));
  const top = h("fieldset", null, h("legend", null, "Job"));
  form.append(top);
  for (const [name, raw] of Object.entries(spec.properties)) {
    const field = resolve(raw, components);
    if (field.properties) {
      const set = h("fieldset", { dataset: { group: name } }, h("legend", null, name), h("p", { class: "hint" }, field.description || ""));
      for (const [inner, innerRaw] of Object.entries(field.properties)) {
        set.append(fieldInput(`${name}.${inner}`, resolve(innerRaw, components), ctx));
      }
      form.append(set);
    } else {
      top.append(fieldInput(name, field, ctx));
    }
  }
  const modelInput = form.querySelector('[data-param="model"]');
  if (!modelInput.value) modelInput.value = "dama/tiny-llava";
  const message = h("div", { id: "form-message" });
  const submit = h("button", { type: "submit", id: "create-job" }, "Start job");
  // What the job would take (memory per GPU, whether it fits, time), asked of a worker before it is started.
  const estimate = h("button", { type: "button", id: "estimate-job", class: "secondary" }, "Estimate");
  const estimateBox = h("div", { id: "job-estimate", class: "card", "aria-live": "polite", hidden: true });
  form.append(h("div", { class: "toolbar" }, submit, estimate), message, estimateBox);
  const refused = (error) => {
    const unplaced = showErrors(form, error);
    mount(message, unplaced.length ? errorBox(error) : h("div", { class: "error" }, "Fix the fields marked below."));
    form.querySelector(".field.invalid input, .field.invalid select")?.focus();
  };
  estimate.addEventListener("click", async () => {
    estimate.disabled = true;
    mount(message);
    estimateBox.hidden = false;
    mount(estimateBox, h("p", { class: "muted" }, "Estimating..."));
    try {
      const waiting = (pending) => mount(estimateBox, h("p", { class: "muted" }, `Waiting for a worker of queue ${pending.queue} (${pending.id})...`));
      const answer = await requestEstimate(collect(form, spec, components), { signal, onWaiting: waiting });
      mount(estimateBox, estimateView(answer));
      estimateBox.scrollIntoView({ block: "nearest" });
    } catch (error) {
      if (error.name === "AbortError") return;
      estimateBox.hidden = true;
      refused(error);
    } finally {
      estimate.disabled = false;
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    mount(message);
    try {
      const job = await api("/jobs", {
        method: "POST",
        json: collect(form, spec, components),
        headers: { "Idempotency-Key": crypto.randomUUID() },
      });
      window.location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      refused(error);
    } finally {
      submit.disabled = false;
    }
  });
  mount(view, h("h1", null, "New job"), h("p", { class: "muted" }, "Defaults and bounds are the API's (JobSpec in ", h("a", { href: "/docs" }, "/docs"), "). Estimate says what the job would take before you start it."), form);
}
