// TinyGPT Lab's live run board: the Train page's progress, metric cards and samples, updated in place.
//
// Streamlit's own st.progress / st.metric / st.code elements are re-created by the browser every time
// a fragment refreshes (once a second per open tab); with three tabs watching, that redrawing cost
// headless Chromium about a third of a core on a 2-core machine (bench/RESULTS.md, issue 10). This
// board keeps its DOM: on each update only the sections whose data changed are touched, and a card
// whose value is unchanged is left alone. Text is set with textContent, never parsed as HTML.
//
// data = {
//   progress: {fraction: 0..1, text} | null,
//   metrics: [{label, value, sub, help}],   // one card each, in a row; sub: small text after the value
//   facts: "a caption line" | null,
//   heading: "bold title over the samples" | null, empty: "shown when there are no samples" | null,
//   samples: [{title, text}], older: {label, samples: [{title, text}]} | null,
// }

const CSS = `.tg-board { font-family: "Source Sans Pro", "Source Sans 3", system-ui, -apple-system, "Segoe UI", sans-serif;
  color: rgb(49, 51, 63); }
.tg-board .tg-progress { margin: 0 0 12px; }
.tg-board .tg-progress-text { font-size: 14px; margin-bottom: 6px; }
.tg-board .tg-bar { height: 8px; border-radius: 4px; background: #e5e7eb; overflow: hidden; }
.tg-board .tg-bar i { display: block; height: 100%; background: #2f6fdb; transition: width .4s ease; }
.tg-board .tg-metrics { display: grid; grid-template-columns: repeat(auto-fit, minmax(96px, 1fr)); gap: 12px;
  margin-bottom: 8px; }
.tg-board .tg-metric-label { font-size: 14px; color: rgba(49, 51, 63, .8); white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.tg-board .tg-metric-label[title] { text-decoration: underline dotted rgba(49, 51, 63, .4); cursor: help; }
.tg-board .tg-metric-value { font-size: 26px; line-height: 1.3; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; font-variant-numeric: tabular-nums; }
.tg-board .tg-metric-sub { font-size: 13px; color: rgba(49, 51, 63, .6); margin-left: 4px; }
.tg-board .tg-facts, .tg-board .tg-caption { font-size: 14px; color: rgba(49, 51, 63, .6); margin: 4px 0; }
.tg-board .tg-heading { font-weight: 600; margin: 0 0 8px; }
.tg-board pre { margin: 0 0 12px; padding: 12px 14px; border-radius: 8px; background: rgb(240, 242, 246);
  font: 13px/1.45 "Source Code Pro", ui-monospace, SFMono-Regular, Menlo, monospace;
  white-space: pre-wrap; word-break: break-word; }
.tg-board details { margin-top: 4px; border: 1px solid rgba(49, 51, 63, .2); border-radius: 8px; padding: 8px 12px; }
.tg-board summary { cursor: pointer; font-size: 14px; }
.tg-board details pre { margin-top: 8px; max-height: 320px; overflow-y: auto; }
`;

function div(cls, parent, tag = "div") {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (parent) parent.appendChild(node);
  return node;
}

function setText(node, text) {
  const t = text ?? "";
  if (node.textContent !== t) node.textContent = t;
}

function renderProgress(box, p) {
  box.hidden = !p;
  if (!p) return;
  if (!box.firstChild) {
    div("tg-progress-text", box);
    div("tg-bar", box).appendChild(document.createElement("i"));
  }
  setText(box.firstChild, p.text);
  const width = `${(100 * Math.min(1, Math.max(0, p.fraction || 0))).toFixed(2)}%`;
  const fill = box.querySelector("i");
  if (fill.style.width !== width) fill.style.width = width;
  box.dataset.fraction = String(p.fraction ?? 0);
}

function renderMetrics(box, metrics) {
  box.hidden = !metrics.length;
  while (box.children.length > metrics.length) box.lastChild.remove();
  metrics.forEach((m, i) => {
    let card = box.children[i];
    if (!card) {
      card = div("tg-metric", box);
      div("tg-metric-label", card);
      const value = div("tg-metric-value", card);
      div("", value, "span");
      div("tg-metric-sub", value, "span");
    }
    const [label, value] = card.children;
    setText(label, m.label);
    if (m.help) label.title = m.help;
    else label.removeAttribute("title");
    setText(value.children[0], m.value);
    setText(value.children[1], m.sub);
    card.dataset.label = m.label;
    card.dataset.value = m.value;
  });
}

function samplesBlock(parent, samples) {
  for (const s of samples) {
    setText(div("tg-caption", parent), s.title);
    setText(div("", parent, "pre"), s.text);
  }
}

function renderSamples(box, data) {
  box.replaceChildren();
  if (data.heading) setText(div("tg-heading", box), data.heading);
  const samples = data.samples || [];
  if (!samples.length && data.empty) setText(div("tg-caption", box), data.empty);
  samplesBlock(box, samples);
  if (data.older && data.older.samples.length) {
    const details = div("", box, "details");
    setText(div("", details, "summary"), data.older.label);
    // One block, as in the summary's count: the older samples are read rarely.
    setText(
      div("", details, "pre"),
      data.older.samples.map((s) => `— ${s.title} —\n${s.text}`).join("\n\n"),
    );
  }
  box.dataset.samples = String(samples.length);
}

function setup(parent) {
  const style = document.createElement("style");
  style.textContent = CSS;
  const root = div("tg-board", parent);
  root.appendChild(style);
  return {
    root,
    progress: div("tg-progress", root),
    metrics: div("tg-metrics", root),
    facts: div("tg-facts", root),
    samples: div("tg-samples", root),
    seen: {},
  };
}

// Re-render a section only when its data changed since the last update (the open <details> of the
// older samples, a hovered help text and the text selection survive every refresh otherwise).
function changed(s, name, value) {
  const key = JSON.stringify(value ?? null);
  if (s.seen[name] === key) return false;
  s.seen[name] = key;
  return true;
}

export default function (component) {
  const { parentElement, data } = component;
  if (!parentElement.__tgBoard) parentElement.__tgBoard = setup(parentElement);
  const s = parentElement.__tgBoard;
  const d = data || {};
  if (changed(s, "progress", d.progress)) renderProgress(s.progress, d.progress);
  if (changed(s, "metrics", d.metrics)) renderMetrics(s.metrics, d.metrics || []);
  if (changed(s, "facts", d.facts)) {
    s.facts.hidden = !d.facts;
    setText(s.facts, d.facts);
  }
  const samples = { heading: d.heading, empty: d.empty, samples: d.samples, older: d.older };
  if (changed(s, "samples", samples)) {
    const open = s.samples.querySelector("details")?.open;
    renderSamples(s.samples, samples);
    const details = s.samples.querySelector("details");
    if (details && open) details.open = true;
  }
  s.root.dataset.updates = String(Number(s.root.dataset.updates || 0) + 1);
}
