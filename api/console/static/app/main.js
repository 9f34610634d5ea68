// The console's router: hash routes (#/jobs/job_...), so the page is one static file and ids never reach the
// server's logs as paths. Every view gets an AbortSignal that fires when the person navigates away.

import { api, forgetKey, getKey, setKey } from "./api.js";
import { errorBox, h, mount } from "./dom.js";
import { comparePage } from "./pages/compare.js";
import { datasetPage, datasetsPage } from "./pages/datasets.js";
import { evaluationPage, evaluationsPage } from "./pages/evaluations.js";
import { jobPage } from "./pages/job.js";
import { jobsPage, newJobPage } from "./pages/jobs.js";
import { loopPage, loopsPage } from "./pages/loops.js";
import { pairGenerationPage, pairGenerationsPage } from "./pages/pair_generations.js";
import { playgroundPage } from "./pages/playground.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const signOut = document.getElementById("sign-out");

const ROUTES = [
  [/^\/datasets$/, datasetsPage, "datasets"],
  [/^\/datasets\/([\w-]+)$/, datasetPage, "datasets"],
  [/^\/jobs$/, jobsPage, "jobs"],
  [/^\/jobs\/new$/, newJobPage, "new"],
  [/^\/jobs\/([\w-]+)$/, jobPage, "jobs"],
  [/^\/compare$/, comparePage, "compare"],
  [/^\/evaluations$/, evaluationsPage, "evaluations"],
  [/^\/evaluations\/([\w-]+)$/, evaluationPage, "evaluations"],
  [/^\/pair-generations$/, pairGenerationsPage, "pair-generations"],
  [/^\/pair-generations\/([\w-]+)$/, pairGenerationPage, "pair-generations"],
  [/^\/loops$/, loopsPage, "loops"],
  [/^\/loops\/([\w-]+)$/, loopPage, "loops"],
  [/^\/playground$/, playgroundPage, "playground"],
];

let current = null;

function parseHash() {
  const raw = window.location.hash.replace(/^#/, "") || "/jobs";
  const [path, query = ""] = raw.split("?");
  return { path, query: new URLSearchParams(query) };
}

function signInPage(message) {
  const input = h("input", {
    id: "api-key",
    type: "password",
    autocomplete: "off",
    placeholder: "dama_...",
    required: true,
    size: 48,
  });
  const status = h("div", { class: "muted" }, message || "");
  const form = h(
    "form",
    { class: "card sign-in", id: "sign-in" },
    h("h1", null, "Sign in"),
    h("p", null, "Paste an API key (", h("code", null, "dama admin create-key --tenant NAME"), "). It stays in this tab."),
    h("label", { for: "api-key" }, "API key"),
    input,
    h("button", { type: "submit" }, "Sign in"),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    setKey(input.value.trim());
    try {
      await api("/datasets", { query: { limit: 1 } });
      route();
    } catch (error) {
      forgetKey();
      mount(status, errorBox(error));
    }
  });
  nav.hidden = true;
  signOut.hidden = true;
  mount(main, form);
  input.focus();
}

async function route() {
  if (current) current.abort();
  current = new AbortController();
  if (!getKey()) {
    signInPage();
    return;
  }
  nav.hidden = false;
  signOut.hidden = false;
  const { path, query } = parseHash();
  for (const [pattern, page, section] of ROUTES) {
    const match = pattern.exec(path);
    if (!match) continue;
    for (const link of nav.querySelectorAll("a[data-nav]")) {
      link.classList.toggle("active", link.dataset.nav === section);
    }
    const view = h("div", { class: "view" });
    mount(main, view);
    try {
      await page(view, { id: match[1], query, signal: current.signal });
    } catch (error) {
      if (error.name !== "AbortError") view.append(errorBox(error));
    }
    return;
  }
  mount(main, h("p", null, "No such page. ", h("a", { href: "#/jobs" }, "Jobs")));
}

signOut.addEventListener("click", () => {
  forgetKey();
  window.location.hash = "#/jobs";
  signInPage("Signed out.");
});
window.addEventListener("dama:unauthorized", () => {
  forgetKey();
  signInPage("The key was refused; sign in again.");
});
// Leaving a page aborts its requests (``current.abort()``); a request a page started from an event handler or a
// timer and did not await (a filter's reload, a poll) then rejects with nobody listening. That is the abort doing
// its work, not an error: keep it out of the browser's console, and let every other rejection through.
window.addEventListener("unhandledrejection", (event) => {
  if (event.reason && event.reason.name === "AbortError") event.preventDefault();
});
window.addEventListener("hashchange", route);
route();
