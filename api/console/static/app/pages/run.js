// A run's page (an evaluation, a pair generation): its facts redrawn every 1.5 s until it ends, and its events
// followed live below them.

import { followEvents } from "../api.js";
import { h, mount } from "../dom.js";
import { ENDED } from "./job.js";

/**
 * `draw(body, urls)` fetches the run, mounts its parts into `body` and returns the run; object URLs it makes go
 * into `urls` and are revoked when the person navigates away.
 */
export async function followRunPage(view, { signal, eventsPath, draw }) {
  const urls = [];
  signal.addEventListener("abort", () => urls.forEach((url) => URL.revokeObjectURL(url)));
  const log = h("ol", { class: "events" });
  const body = h("div");
  mount(view, body, h("section", { class: "card" }, h("h2", null, "Events"), log));
  let run = await draw(body, urls);
  const stream = followEvents(eventsPath, (event) => {
    log.append(h("li", null, h("span", { class: "event-type" }, event.type), " ", event.message));
  }, { signal }).catch(() => null);
  while (!signal.aborted && !ENDED.has(run.status)) {
    await new Promise((resolve) => setTimeout(resolve, 1500));
    if (!signal.aborted) run = await draw(body, urls);
  }
  await stream;
}
