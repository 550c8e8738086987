// TinyGPT Lab's live loss chart: an SVG line chart that is updated in place.
//
// Streamlit calls the exported function on the first render and again whenever the page sends new
// data. The chart keeps its DOM and its view between calls: only the paths, axes and legend whose
// data changed are rebuilt (paths are rewritten in place), and a zoom the user chose (drag across the plot; double-click or
// "Reset zoom" to undo) survives every update. Text is set with textContent, never parsed as HTML.
//
// data = {
//   series: [{name, color, width, opacity, x: [...], y: [...], markers: bool}],  // drawn in order
//   band: {x: [...], lo: [...], hi: [...], color} | null,   // shaded train→val gap
//   best: {x, y, label} | null,                              // starred best val point
//   marks: [{x, label}],                                     // vertical markers
//   ylabel, log: bool, digits, height,
//   empty: "message when there is nothing to draw", note: "a one-line remark under the legend" | absent
// }

const NS = "http://www.w3.org/2000/svg";
// Every rule is scoped by the .tg-live-chart class: the chart lives in the page's own DOM.
const CSS = `.tg-live-chart { position: relative; font: 12px Inter, system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif;
  color: #1f2937; user-select: none; }
.tg-live-chart svg { display: block; overflow: visible; }
.tg-live-chart .tg-grid line { stroke: #e5e7eb; stroke-width: 1; }
.tg-live-chart .tg-axes text { fill: #4b5563; }
.tg-live-chart .tg-title { fill: #374151; font-size: 12px; }
.tg-live-chart .tg-empty { fill: #6b7280; font-size: 14px; }
.tg-live-chart .tg-cursor { stroke: #9ca3af; stroke-dasharray: 3 3; }
.tg-live-chart .tg-brush { fill: rgba(47, 111, 219, 0.12); stroke: rgba(47, 111, 219, 0.5); }
.tg-live-chart .tg-mark { stroke: #8e44ad; stroke-dasharray: 4 3; }
.tg-live-chart .tg-mark-label { fill: #8e44ad; font-size: 11px; }
.tg-live-chart .tg-star { fill: #f2b705; stroke: #7a5c00; stroke-width: 1; }
.tg-live-chart .tg-best { fill: #7a5c00; font-size: 12px; paint-order: stroke; stroke: #fff; stroke-width: 3px; }
.tg-live-chart .tg-legend { display: flex; flex-wrap: wrap; gap: 4px 16px; min-height: 18px; }
.tg-live-chart .tg-legend span { display: inline-flex; align-items: center; gap: 6px; }
.tg-live-chart .tg-legend i { display: inline-block; width: 16px; height: 3px; border-radius: 2px; }
.tg-live-chart .tg-note { color: #6b7280; min-height: 0; }
.tg-live-chart .tg-tip { position: absolute; display: none; pointer-events: none; background: rgba(255,255,255,.95);
  border: 1px solid #d1d5db; border-radius: 6px; padding: 4px 8px; box-shadow: 0 2px 6px rgba(0,0,0,.08);
  white-space: nowrap; z-index: 2; }
.tg-live-chart .tg-reset { position: absolute; top: 22px; right: 16px; font: inherit; font-size: 12px;
  border: 1px solid #d1d5db; border-radius: 6px; background: #fff; padding: 2px 8px; cursor: pointer; }
`;
const PAD = { left: 58, right: 16, top: 30, bottom: 40 };

function el(tag, attrs, parent) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// Round tick positions: 1, 2 or 5 times a power of ten, about `count` of them across [lo, hi].
function ticks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
  return out;
}

function fmtTick(v) {
  const a = Math.abs(v);
  if (a >= 10000) return (v / 1000).toFixed(0) + "k";
  if (a >= 1000) return (v / 1000).toFixed(1).replace(/\.0$/, "") + "k";
  return +v.toPrecision(4) + "";
}

function extent(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v === null || !isFinite(v)) continue;
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return [lo, hi];
}

function setup(root) {
  root.innerHTML = "";
  const wrap = document.createElement("div");
  wrap.className = "tg-live-chart";
  const style = document.createElement("style");
  style.textContent = CSS;
  root.append(style, wrap);
  const svg = el("svg", { width: "100%", role: "img" }, wrap);
  const clipId = "tgclip" + Math.random().toString(36).slice(2);
  const clip = el("rect", {}, el("clipPath", { id: clipId }, el("defs", {}, svg)));
  const s = {
    wrap,
    svg,
    clip,
    grid: el("g", { class: "tg-grid" }, svg),
    axes: el("g", { class: "tg-axes" }, svg),
    plot: el("g", { "clip-path": `url(#${clipId})` }, svg),
    over: el("g", {}, svg),
    legend: document.createElement("div"),
    note: document.createElement("div"),
    tip: document.createElement("div"),
    empty: el("text", { class: "tg-empty", "text-anchor": "middle" }, svg),
    paths: [],
    view: null, // [x0, x1] chosen by the user, kept across updates
    data: null,
    width: 0,
  };
  s.band = el("path", { stroke: "none" }, s.plot);
  s.marks = el("g", {}, s.plot);
  s.lines = el("g", {}, s.plot);
  s.best = el("g", {}, s.plot);
  s.bestLabel = el("g", {}, s.over); // outside the clip, so a label near the edge is not cut
  s.cursor = el("line", { class: "tg-cursor", visibility: "hidden" }, s.over);
  s.brush = el("rect", { class: "tg-brush", visibility: "hidden" }, s.over);
  s.hit = el("rect", { fill: "transparent", style: "cursor: crosshair" }, s.over);
  s.legend.className = "tg-legend";
  s.note.className = "tg-note";
  s.tip.className = "tg-tip";
  s.reset = document.createElement("button");
  s.reset.className = "tg-reset";
  s.reset.textContent = "Reset zoom";
  s.reset.style.display = "none";
  s.reset.onclick = () => {
    s.view = null;
    draw(s);
  };
  wrap.prepend(s.legend, s.note);
  wrap.appendChild(s.tip);
  wrap.appendChild(s.reset);
  interact(s);
  new ResizeObserver(() => {
    if (wrap.clientWidth && wrap.clientWidth !== s.width) draw(s);
  }).observe(wrap);
  return s;
}

function scales(s) {
  const d = s.data;
  const W = s.width;
  const H = d.height || 360;
  let [x0, x1] = extent(d.series.flatMap((t) => t.x));
  x0 = Math.min(0, x0); // the whole run from step 0, as it fills in
  if (s.view) [x0, x1] = s.view;
  if (!(x1 > x0)) x1 = x0 + 1;
  const ys = [];
  for (const t of d.series) t.x.forEach((x, i) => x >= x0 && x <= x1 && ys.push(t.y[i]));
  let [y0, y1] = extent(ys.filter((v) => !d.log || v > 0));
  if (!isFinite(y0)) [y0, y1] = [0, 1];
  const f = d.log ? Math.log10 : (v) => v;
  let [f0, f1] = [f(y0), f(y1)];
  const pad = (f1 - f0) * 0.06 || 0.5;
  f0 -= pad;
  f1 += pad;
  const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const sy = (y) => PAD.top + (1 - (f(y) - f0) / (f1 - f0)) * (H - PAD.top - PAD.bottom);
  const invx = (px) => x0 + ((px - PAD.left) / (W - PAD.left - PAD.right)) * (x1 - x0);
  return { W, H, x0, x1, f0, f1, sx, sy, invx };
}

function pathOf(xs, ys, sx, sy) {
  let d = "";
  let pen = false;
  for (let i = 0; i < xs.length; i++) {
    const y = ys[i];
    if (y === null || !isFinite(y)) {
      pen = false;
      continue;
    }
    d += (pen ? "L" : "M") + sx(xs[i]).toFixed(1) + " " + sy(y).toFixed(1);
    pen = true;
  }
  return d;
}

function draw(s) {
  const d = s.data;
  s.width = s.wrap.clientWidth || 600;
  const sc = scales(s);
  const { W, H, sx, sy } = sc;
  s.svg.setAttribute("height", H);
  s.svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  s.clip.setAttribute("x", PAD.left);
  s.clip.setAttribute("y", PAD.top - 6);
  s.clip.setAttribute("width", Math.max(0, W - PAD.left - PAD.right));
  s.clip.setAttribute("height", Math.max(0, H - PAD.top - PAD.bottom + 12));
  for (const r of [s.hit, s.brush]) {
    r.setAttribute("y", PAD.top);
    r.setAttribute("height", H - PAD.top - PAD.bottom);
  }
  s.hit.setAttribute("x", PAD.left);
  s.hit.setAttribute("width", Math.max(0, W - PAD.left - PAD.right));
  s.reset.style.display = s.view ? "" : "none";

  const points = d.series.reduce((n, t) => n + t.x.length, 0);
  s.wrap.dataset.points = points; // read by tests and the watched-page benchmark
  s.wrap.dataset.updates = (+s.wrap.dataset.updates || 0) + 1;
  s.wrap.dataset.view = s.view ? s.view.map((v) => v.toFixed(1)).join(",") : "";
  s.empty.textContent = points ? "" : d.empty || "";
  s.note.textContent = d.note || "";
  s.empty.setAttribute("x", W / 2);
  s.empty.setAttribute("y", H / 2);

  // Axes and grid
  s.grid.replaceChildren();
  s.axes.replaceChildren();
  const xt = ticks(sc.x0, sc.x1, Math.max(2, Math.floor((W - PAD.left - PAD.right) / 90)));
  for (const t of xt) {
    const x = sx(t);
    el("line", { x1: x, x2: x, y1: PAD.top, y2: H - PAD.bottom }, s.grid);
    el("text", { x, y: H - PAD.bottom + 16, "text-anchor": "middle" }, s.axes).textContent = fmtTick(t);
  }
  const yt = d.log
    ? ticks(sc.f0, sc.f1, 5).map((v) => Math.pow(10, v))
    : ticks(sc.f0, sc.f1, Math.max(2, Math.floor((H - PAD.top - PAD.bottom) / 50)));
  for (const t of yt) {
    const y = sy(t);
    el("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y }, s.grid);
    el("text", { x: PAD.left - 6, y: y + 4, "text-anchor": "end" }, s.axes).textContent = fmtTick(t);
  }
  el("text", { x: (PAD.left + W - PAD.right) / 2, y: H - 6, "text-anchor": "middle", class: "tg-title" }, s.axes)
    .textContent = "step";
  el("text", { x: 14, y: PAD.top - 12, class: "tg-title" }, s.axes).textContent = d.ylabel || "";

  // The gap band, the markers, the lines (one path per series, reused), the best point
  if (d.band && d.band.x.length > 1) {
    const up = pathOf(d.band.x, d.band.hi, sx, sy);
    const xs = [...d.band.x].reverse();
    const down = pathOf(xs, [...d.band.lo].reverse(), sx, sy).replace(/^M/, "L");
    s.band.setAttribute("d", up + down + "Z");
    s.band.setAttribute("fill", d.band.color);
  } else s.band.setAttribute("d", "");
  s.marks.replaceChildren();
  for (const m of d.marks || []) {
    const x = sx(m.x);
    el("line", { x1: x, x2: x, y1: PAD.top, y2: H - PAD.bottom, class: "tg-mark" }, s.marks);
    el("text", { x: x + 4, y: PAD.top + 10, class: "tg-mark-label" }, s.marks).textContent = m.label;
  }
  while (s.paths.length < d.series.length) s.paths.push({ line: el("path", { fill: "none" }, s.lines), dots: el("g", {}, s.lines) });
  s.paths.forEach((p, i) => {
    const t = d.series[i];
    p.line.setAttribute("d", t ? pathOf(t.x, t.y, sx, sy) : "");
    p.dots.replaceChildren();
    if (!t) return;
    p.line.setAttribute("stroke", t.color);
    p.line.setAttribute("stroke-width", t.width || 1.5);
    p.line.setAttribute("stroke-opacity", t.opacity ?? 1);
    if (t.markers && t.x.length <= 400)
      t.x.forEach((x, j) => {
        if (t.y[j] !== null && isFinite(t.y[j])) el("circle", { cx: sx(x), cy: sy(t.y[j]), r: 3, fill: t.color }, p.dots);
      });
  });
  s.best.replaceChildren();
  s.bestLabel.replaceChildren();
  if (d.best && d.best.x >= sc.x0 && d.best.x <= sc.x1) {
    const bx = sx(d.best.x);
    const by = sy(d.best.y);
    el("path", { d: star(bx, by, 8), class: "tg-star" }, s.best);
    const anchor = bx > W - PAD.right - 110 ? "end" : bx < PAD.left + 110 ? "start" : "middle";
    el("text", { x: bx, y: by - 12, "text-anchor": anchor, class: "tg-best" }, s.bestLabel).textContent = d.best.label;
  }

  // Legend: one entry per named series, rebuilt only when the names change
  const names = d.series.filter((t) => t.name).map((t) => t.name + "|" + t.color).join(";");
  if (s.legend.dataset.names !== names) {
    s.legend.dataset.names = names;
    s.legend.replaceChildren();
    for (const t of d.series.filter((t) => t.name)) {
      const item = document.createElement("span");
      const sw = document.createElement("i");
      sw.style.background = t.color;
      sw.style.opacity = t.opacity ?? 1;
      item.append(sw, document.createTextNode(t.name));
      s.legend.appendChild(item);
    }
  }
}

function star(cx, cy, r) {
  let p = "";
  for (let i = 0; i < 10; i++) {
    const a = -Math.PI / 2 + (i * Math.PI) / 5;
    const rr = i % 2 ? r * 0.45 : r;
    p += (i ? "L" : "M") + (cx + rr * Math.cos(a)).toFixed(1) + " " + (cy + rr * Math.sin(a)).toFixed(1);
  }
  return p + "Z";
}

// Hover shows every series' value at the nearest step; a horizontal drag zooms to that range.
function interact(s) {
  let dragFrom = null;
  const local = (ev) => {
    const r = s.svg.getBoundingClientRect();
    return (ev.clientX - r.left) * (s.width / r.width);
  };
  s.hit.addEventListener("pointerdown", (ev) => {
    dragFrom = local(ev);
    s.hit.setPointerCapture(ev.pointerId);
  });
  s.hit.addEventListener("pointermove", (ev) => {
    if (!s.data) return;
    const px = local(ev);
    const sc = scales(s);
    if (dragFrom !== null) {
      s.brush.setAttribute("x", Math.min(dragFrom, px));
      s.brush.setAttribute("width", Math.abs(px - dragFrom));
      s.brush.setAttribute("visibility", "visible");
    }
    hover(s, sc, px, ev);
  });
  s.hit.addEventListener("pointerup", (ev) => {
    const px = local(ev);
    s.brush.setAttribute("visibility", "hidden");
    if (dragFrom !== null && Math.abs(px - dragFrom) > 6 && s.data) {
      const sc = scales(s);
      const [a, b] = [sc.invx(Math.min(dragFrom, px)), sc.invx(Math.max(dragFrom, px))];
      s.view = [a, b];
      draw(s);
    }
    dragFrom = null;
  });
  s.hit.addEventListener("dblclick", () => {
    s.view = null;
    draw(s);
  });
  s.hit.addEventListener("pointerleave", () => {
    s.cursor.setAttribute("visibility", "hidden");
    s.tip.style.display = "none";
  });
}

function hover(s, sc, px, ev) {
  const x = sc.invx(px);
  const rows = [];
  let at = null;
  for (const t of s.data.series) {
    if (!t.name || !t.x.length) continue;
    let best = 0;
    for (let i = 1; i < t.x.length; i++) if (Math.abs(t.x[i] - x) < Math.abs(t.x[best] - x)) best = i;
    if (t.y[best] === null || !isFinite(t.y[best])) continue;
    if (at === null || Math.abs(t.x[best] - x) < Math.abs(at - x)) at = t.x[best];
    rows.push([t.name, t.y[best].toFixed(s.data.digits ?? 3), t.color]);
  }
  if (at === null) return;
  s.cursor.setAttribute("x1", sc.sx(at));
  s.cursor.setAttribute("x2", sc.sx(at));
  s.cursor.setAttribute("y1", PAD.top);
  s.cursor.setAttribute("y2", sc.H - PAD.bottom);
  s.cursor.setAttribute("visibility", "visible");
  s.tip.replaceChildren();
  const head = document.createElement("b");
  head.textContent = "step " + Math.round(at);
  s.tip.appendChild(head);
  for (const [name, v, color] of rows) {
    const line = document.createElement("div");
    line.style.color = color;
    line.textContent = name + " " + v;
    s.tip.appendChild(line);
  }
  const r = s.wrap.getBoundingClientRect();
  s.tip.style.display = "block";
  s.tip.style.left = Math.min(ev.clientX - r.left + 14, r.width - 170) + "px";
  s.tip.style.top = ev.clientY - r.top + 10 + "px";
}

export default function (component) {
  const { parentElement, data } = component;
  if (!parentElement.__tgLive) parentElement.__tgLive = setup(parentElement);
  const s = parentElement.__tgLive;
  s.data = data || { series: [] };
  draw(s);
}
