// Small SVG charts (no library: a few line and bar charts are less code than wiring one in, and SVG needs no
// inline script or style, so it works under the console's CSP). Series colours come from console.css (.s0 ...).

import { fmt, h, s } from "./dom.js";

const WIDTH = 460;
const HEIGHT = 220;
const PAD = { left: 56, right: 12, top: 12, bottom: 30 };

/** [low, high] of values, widened by `margin` of the range on both sides (dots at the extremes stay whole). */
function extent(values, margin = 0) {
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (!Number.isFinite(low) || !Number.isFinite(high)) return [0, 1];
  if (low === high) {
    const pad = Math.abs(low) * 0.1 || 1;
    low -= pad;
    high += pad;
  }
  const room = (high - low) * margin;
  return [low - room, high + room];
}

function ticks(low, high, count) {
  return Array.from({ length: count + 1 }, (_, i) => low + ((high - low) * i) / count);
}

function scale([d0, d1], [r0, r1]) {
  return (value) => r0 + ((value - d0) / (d1 - d0)) * (r1 - r0);
}

function frame(title, legend, svg) {
  return h("figure", { class: "chart" }, h("figcaption", null, title), svg, legend);
}

function legendFor(series) {
  if (series.length < 2 && !series.some((item) => item.band)) return null;
  return h(
    "ul",
    { class: "legend" },
    series.map((item, i) => h("li", null, h("span", { class: `swatch s${item.color ?? i}` }), item.label)),
  );
}

/**
 * A line chart. series: [{label, points: [[x, y], ...], band?: [[x, low, high], ...], dots?: true, color?}].
 * The SVG carries data-points (how many points are drawn) so a test can tell a chart with data from an empty one.
 */
export function lineChart({ title, series, xLabel = "step" }) {
  const xs = [];
  const ys = [];
  for (const item of series) {
    for (const [x, y] of item.points) {
      xs.push(x);
      ys.push(y);
    }
    for (const [x, low, high] of item.band || []) {
      xs.push(x);
      ys.push(low, high);
    }
  }
  const svg = s("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    class: "plot",
    role: "img",
    "aria-label": title,
    "data-points": String(series.reduce((n, item) => n + item.points.length, 0)),
  });
  if (!xs.length) {
    svg.append(s("text", { x: WIDTH / 2, y: HEIGHT / 2, class: "empty", "text-anchor": "middle" }, "no data yet"));
    return frame(title, null, svg);
  }
  const xDomain = extent(xs);
  const yDomain = extent(ys, 0.06);
  const x = scale(xDomain, [PAD.left, WIDTH - PAD.right]);
  const y = scale(yDomain, [HEIGHT - PAD.bottom, PAD.top]);
  const axes = s("g", { class: "axes" });
  for (const value of ticks(...yDomain, 4)) {
    axes.append(s("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value), class: "grid" }));
    axes.append(s("text", { x: PAD.left - 6, y: y(value) + 4, "text-anchor": "end" }, fmt(value, 3)));
  }
  // Whole-number x (rounds, steps) over a short range: one tick per value, never "0 0 1 1 2".
  const whole = xs.every(Number.isInteger) && xDomain[1] - xDomain[0] < 5 && Number.isInteger(xDomain[0]);
  for (const value of ticks(...xDomain, whole ? Math.max(1, xDomain[1] - xDomain[0]) : 5)) {
    axes.append(s("text", { x: x(value), y: HEIGHT - PAD.bottom + 16, "text-anchor": "middle" }, fmt(value, 0)));
  }
  axes.append(s("text", { x: WIDTH - PAD.right, y: HEIGHT - 2, "text-anchor": "end", class: "axis-label" }, xLabel));
  svg.append(axes);
  // Dotted series draw rings, each a size larger than the one before it, so equal values do not hide each other.
  const ringRadius = new Map(series.filter((item) => item.dots).map((item, k) => [item, 3.5 + 2.5 * k]));
  series.forEach((item, i) => {
    const colour = `s${item.color ?? i}`;
    if (item.band && item.band.length) {
      const top = item.band.map(([bx, , high]) => `${x(bx)},${y(high)}`);
      const bottom = item.band.map(([bx, low]) => `${x(bx)},${y(low)}`).reverse();
      svg.append(s("polygon", { points: [...top, ...bottom].join(" "), class: `band ${colour}` }));
    }
    if (!item.points.length) return;
    if (!item.dots) {
      const d = item.points.map(([px, py], j) => `${j ? "L" : "M"}${x(px).toFixed(1)},${y(py).toFixed(1)}`);
      svg.append(s("path", { d: d.join(""), class: `line ${colour}`, "data-series": item.label }));
    }
    if (item.dots || item.points.length === 1) {
      const ring = ringRadius.get(item);
      const shape = ring === undefined || ring === 3.5 ? { r: 3.5, class: `dot ${colour}` } : { r: ring, class: `ring ${colour}` };
      for (const [px, py] of item.points) {
        svg.append(s("circle", { cx: x(px), cy: y(py), ...shape }, s("title", null, `${item.label}, ${px}: ${fmt(py)}`)));
      }
    }
  });
  return frame(title, legendFor(series), svg);
}

/** A histogram: bins [{low, high, count}]. */
export function barChart({ title, bins }) {
  const svg = s("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    class: "plot",
    role: "img",
    "aria-label": title,
    "data-points": String(bins.length),
  });
  if (!bins.length) {
    svg.append(s("text", { x: WIDTH / 2, y: HEIGHT / 2, class: "empty", "text-anchor": "middle" }, "no data"));
    return frame(title, null, svg);
  }
  const top = Math.max(...bins.map((bin) => bin.count), 1);
  const y = scale([0, top], [HEIGHT - PAD.bottom, PAD.top]);
  const step = (WIDTH - PAD.left - PAD.right) / bins.length;
  const axes = s("g", { class: "axes" });
  for (const value of ticks(0, top, 4)) {
    axes.append(s("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value), class: "grid" }));
    axes.append(s("text", { x: PAD.left - 6, y: y(value) + 4, "text-anchor": "end" }, fmt(value, 1)));
  }
  svg.append(axes);
  bins.forEach((bin, i) => {
    const left = PAD.left + i * step;
    svg.append(
      s(
        "rect",
        { x: left + 1, y: y(bin.count), width: Math.max(step - 2, 1), height: y(0) - y(bin.count), class: "bar s0" },
        s("title", null, `${fmt(bin.low)} - ${fmt(bin.high)}: ${bin.count}`),
      ),
    );
    if (bins.length <= 12 || i % Math.ceil(bins.length / 8) === 0) {
      svg.append(s("text", { x: left + step / 2, y: HEIGHT - PAD.bottom + 16, "text-anchor": "middle" }, fmt(bin.low, 2)));
    }
  });
  return frame(title, null, svg);
}

/** Grouped bars for a few categories and models: groups [{label, values: {model: number}}]. */
export function groupedBars({ title, groups, models }) {
  const bins = [];
  const svg = s("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "plot", role: "img", "aria-label": title });
  const values = groups.flatMap((group) => models.map((model) => group.values[model] ?? 0));
  const [low, high] = extent([0, ...values]);
  const y = scale([Math.min(low, 0), high], [HEIGHT - PAD.bottom, PAD.top]);
  const groupWidth = (WIDTH - PAD.left - PAD.right) / Math.max(groups.length, 1);
  const barWidth = (groupWidth - 10) / Math.max(models.length, 1);
  const axes = s("g", { class: "axes" });
  for (const value of ticks(Math.min(low, 0), high, 4)) {
    axes.append(s("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value), class: "grid" }));
    axes.append(s("text", { x: PAD.left - 6, y: y(value) + 4, "text-anchor": "end" }, fmt(value, 2)));
  }
  svg.append(axes);
  groups.forEach((group, g) => {
    const left = PAD.left + g * groupWidth + 5;
    models.forEach((model, m) => {
      const value = group.values[model];
      if (value === null || value === undefined) return;
      const top = Math.min(y(value), y(0));
      bins.push(value);
      svg.append(
        s(
          "rect",
          { x: left + m * barWidth, y: top, width: barWidth - 2, height: Math.abs(y(value) - y(0)), class: `bar s${m}` },
          s("title", null, `${group.label}, ${model}: ${fmt(value)}`),
        ),
      );
    });
    svg.append(
      s("text", { x: left + (groupWidth - 10) / 2, y: HEIGHT - PAD.bottom + 16, "text-anchor": "middle" }, group.label),
    );
  });
  svg.setAttribute("data-points", String(bins.length));
  const legend = h(
    "ul",
    { class: "legend" },
    models.map((model, i) => h("li", null, h("span", { class: `swatch s${i}` }), model)),
  );
  return frame(title, legend, svg);
}
