// scMMGPT explorer: a WebGL scatter of the cells and the controls of the page. No libraries, no
// network beyond this server. Arrays arrive as raw little-endian bytes (the map) or base64 in JSON.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  n: 0, xy: null, colors: null, base: null, hover: -1, selected: -1,
  scale: 1, ox: 0, oy: 0, generated: [], highlighted: 0, legend: [], ready: false, lastError: "",
};
window.explorer = state;

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
  "#c7c7c7", "#dbdb8d", "#9edae5"];
const UNASSIGNED = "#d0d0d0";

function rgb(hex) { const v = parseInt(hex.slice(1), 16); return [(v >> 16) & 255, (v >> 8) & 255, v & 255]; }
function viridis(t) {  // 5-stop approximation of matplotlib's viridis
  const s = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  t = Math.min(1, Math.max(0, isFinite(t) ? t : 0)) * 4;
  const i = Math.min(3, Math.floor(t)), f = t - i;
  return s[i].map((c, k) => Math.round(c + f * (s[i + 1][k] - c)));
}
function decode(a) {
  const bin = atob(a.b64), buf = new ArrayBuffer(bin.length), u8 = new Uint8Array(buf);
  for (let i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
  const T = { float32: Float32Array, uint16: Uint16Array, int32: Int32Array, float64: Float64Array }[a.dtype];
  return new T(buf);
}
function showError(msg) {
  state.lastError = msg; const e = $("error"); e.textContent = msg; e.hidden = !msg;
  if (msg) setTimeout(() => { if (state.lastError === msg) e.hidden = true; }, 8000);
}
async function api(path, body) {
  const r = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const ct = r.headers.get("content-type") || "";
  const data = ct.includes("json") ? await r.json() : await r.arrayBuffer();
  if (!r.ok) throw new Error((data && data.error) || r.statusText);
  return data;
}
async function poll(job, status) {
  for (;;) {
    const s = await api("/api/job/" + job);
    if (s.state === "done") { status.textContent = `done in ${s.elapsed_s} s`; return s.result; }
    if (s.state === "error") throw new Error(s.error);
    status.textContent = `${s.state}… ${s.elapsed_s} s`;
    await new Promise((r) => setTimeout(r, 300));
  }
}
function busy(btn, on) { btn.disabled = on; }

// ------------------------------------------------------------------------------------ WebGL map
const canvas = $("map");
const gl = canvas.getContext("webgl", { antialias: false, preserveDrawingBuffer: true });
let prog, bufPos, bufCol, bufGenPos, bufGenCol;
const VS = `attribute vec2 p; attribute vec4 c; uniform vec2 s; uniform vec2 o; uniform float z;
  varying vec4 v; void main(){ gl_Position = vec4(p * s + o, 0., 1.); gl_PointSize = z; v = c; }`;
const FS = `precision mediump float; varying vec4 v; void main(){ vec2 d = gl_PointCoord - .5;
  if (dot(d, d) > .25) discard; gl_FragColor = v; }`;
function initGL() {
  if (!gl) { showError("This browser has no WebGL: the map cannot be drawn."); return false; }
  const sh = (type, src) => { const x = gl.createShader(type); gl.shaderSource(x, src); gl.compileShader(x); return x; };
  prog = gl.createProgram();
  gl.attachShader(prog, sh(gl.VERTEX_SHADER, VS)); gl.attachShader(prog, sh(gl.FRAGMENT_SHADER, FS));
  gl.linkProgram(prog); gl.useProgram(prog);
  [bufPos, bufCol, bufGenPos, bufGenCol] = [gl.createBuffer(), gl.createBuffer(), gl.createBuffer(), gl.createBuffer()];
  gl.enable(gl.BLEND); gl.blendFunc(gl.SRC_ALPHA, gl.ONE_MINUS_SRC_ALPHA);
  return true;
}
function pointSize() {
  const base = state.n > 50000 ? 2 : state.n > 5000 ? 3 : 5;
  return Math.min(14, base * Math.sqrt(state.scale)) * (window.devicePixelRatio || 1);
}
function draw() {
  if (!gl || !state.xy) return;
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth * dpr, h = canvas.clientHeight * dpr;
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  gl.viewport(0, 0, w, h); gl.clearColor(1, 1, 1, 1); gl.clear(gl.COLOR_BUFFER_BIT);
  const aspect = w / h, sx = state.scale * (aspect > 1 ? 1 / aspect : 1), sy = state.scale * (aspect > 1 ? 1 : aspect);
  gl.uniform2f(gl.getUniformLocation(prog, "s"), sx * 0.95, sy * 0.95);
  gl.uniform2f(gl.getUniformLocation(prog, "o"), state.ox, state.oy);
  const layer = (pos, col, n, size) => {
    gl.uniform1f(gl.getUniformLocation(prog, "z"), size);
    const lp = gl.getAttribLocation(prog, "p"), lc = gl.getAttribLocation(prog, "c");
    gl.bindBuffer(gl.ARRAY_BUFFER, pos); gl.enableVertexAttribArray(lp); gl.vertexAttribPointer(lp, 2, gl.FLOAT, false, 0, 0);
    gl.bindBuffer(gl.ARRAY_BUFFER, col); gl.enableVertexAttribArray(lc);
    gl.vertexAttribPointer(lc, 4, gl.UNSIGNED_BYTE, true, 0, 0);
    gl.drawArrays(gl.POINTS, 0, n);
  };
  layer(bufPos, bufCol, state.n, pointSize());
  const g = state.genXY ? state.genXY.length / 2 : 0;
  if (g) layer(bufGenPos, bufGenCol, g, pointSize() * 2.2);
}
// one frame of pan / zoom, finished (the benchmark times it)
state.frame = () => { draw(); if (gl) gl.readPixels(0, 0, 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, new Uint8Array(4)); };

function upload(buf, data) { gl.bindBuffer(gl.ARRAY_BUFFER, buf); gl.bufferData(gl.ARRAY_BUFFER, data, gl.STATIC_DRAW); }
function setColors(rgba) { state.colors = rgba; if (gl) { upload(bufCol, rgba); draw(); } }

// normalise the map into [-1, 1] once; keep a grid index for hover
let grid = null;
const G = 128;
function setCoords(raw) {
  const n = raw.length / 2; let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (let i = 0; i < n; i++) { const x = raw[2 * i], y = raw[2 * i + 1];
    if (isFinite(x) && isFinite(y)) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); } }
  const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2, half = Math.max(x1 - x0, y1 - y0) / 2 || 1;
  state.norm = (x, y) => [(x - cx) / half, (y - cy) / half];
  const xy = new Float32Array(2 * n);
  for (let i = 0; i < n; i++) { const [a, b] = state.norm(raw[2 * i], raw[2 * i + 1]); xy[2 * i] = a; xy[2 * i + 1] = b; }
  state.xy = xy; state.n = n;
  const cells = Array.from({ length: G * G }, () => []);
  for (let i = 0; i < n; i++) { const k = gridKey(xy[2 * i], xy[2 * i + 1]); if (k >= 0) cells[k].push(i); }
  grid = cells;
  if (gl) upload(bufPos, xy);
}
function gridKey(x, y) {
  const gx = Math.floor((x + 1) / 2 * (G - 1)), gy = Math.floor((y + 1) / 2 * (G - 1));
  return gx >= 0 && gx < G && gy >= 0 && gy < G ? gy * G + gx : -1;
}
function toData(px, py) {  // canvas pixel -> normalised data coordinates
  const w = canvas.clientWidth, h = canvas.clientHeight, aspect = w / h;
  const sx = state.scale * (aspect > 1 ? 1 / aspect : 1) * 0.95, sy = state.scale * (aspect > 1 ? 1 : aspect) * 0.95;
  const cx = px / w * 2 - 1, cy = 1 - py / h * 2;
  return [(cx - state.ox) / sx, (cy - state.oy) / sy, sx * w / 2];
}
function nearest(px, py) {
  if (!grid) return -1;
  const [x, y, pxPerUnit] = toData(px, py), r = 8 / pxPerUnit;
  let best = -1, bd = r * r;
  const gx = Math.floor((x + 1) / 2 * (G - 1)), gy = Math.floor((y + 1) / 2 * (G - 1));
  const span = Math.ceil(r / (2 / (G - 1))) + 1;
  for (let j = gy - span; j <= gy + span; j++) for (let i = gx - span; i <= gx + span; i++) {
    if (i < 0 || j < 0 || i >= G || j >= G) continue;
    for (const c of grid[j * G + i]) { const dx = state.xy[2 * c] - x, dy = state.xy[2 * c + 1] - y, d = dx * dx + dy * dy;
      if (d < bd) { bd = d; best = c; } }
  }
  return best;
}

// pan and zoom
let drag = null;
canvas.addEventListener("mousedown", (e) => { drag = { x: e.clientX, y: e.clientY, ox: state.ox, oy: state.oy, moved: false }; });
window.addEventListener("mouseup", (e) => {
  if (drag && !drag.moved && e.target === canvas) { const i = nearest(e.offsetX, e.offsetY); if (i >= 0) selectCell(i); }
  drag = null;
});
canvas.addEventListener("mousemove", (e) => {
  if (drag) {
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
    state.ox = drag.ox + dx / canvas.clientWidth * 2; state.oy = drag.oy - dy / canvas.clientHeight * 2; draw(); return;
  }
  hoverAt(e.offsetX, e.offsetY);
});
canvas.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
canvas.addEventListener("wheel", (e) => {
  e.preventDefault();
  const f = Math.exp(-e.deltaY * 0.0015), w = canvas.clientWidth, h = canvas.clientHeight;
  const cx = e.offsetX / w * 2 - 1, cy = 1 - e.offsetY / h * 2;
  state.ox = cx - (cx - state.ox) * f; state.oy = cy - (cy - state.oy) * f; state.scale *= f; draw();
}, { passive: false });
window.addEventListener("resize", draw);

let hoverTimer = null;
function hoverAt(px, py) {
  const i = nearest(px, py), tip = $("tooltip");
  if (i < 0) { tip.hidden = true; return; }
  clearTimeout(hoverTimer);
  hoverTimer = setTimeout(async () => {
    try {
      const c = await api("/api/cell/" + i);
      const lines = [c.obs_name, ...Object.entries(c.obs).slice(0, 8).map(([k, v]) => `${k}: ${v}`)];
      if (state.scores) lines.push(`search score: ${state.scores[i].toFixed(3)}`);
      tip.textContent = lines.join("\n"); tip.style.left = px + 14 + "px"; tip.style.top = py + 10 + "px"; tip.hidden = false;
    } catch (err) { /* the cursor moved on */ }
  }, 60);
}

// ------------------------------------------------------------------------------------ colouring
function legendCategorical(cats, colors, counts) {
  state.legend = cats.slice();
  $("legend").innerHTML = cats.map((c, k) => `<div class="item"><span class="sw" style="background:${colors[k]}"></span>` +
    `${escapeHtml(c)}${counts ? ` <span class="muted">(${counts[k]})</span>` : ""}</div>`).join("");
}
function legendContinuous(title, lo, hi) {
  state.legend = [title];
  const stops = [0, .25, .5, .75, 1].map((t) => `rgb(${viridis(t).join(",")})`).join(",");
  $("legend").innerHTML = `<div>${escapeHtml(title)}</div><div class="bar" style="background:linear-gradient(90deg,${stops})"></div>` +
    `<div class="muted">${lo.toFixed(2)} … ${hi.toFixed(2)}</div>`;
}
function escapeHtml(s) { return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c])); }
function paintCategorical(codes, cats) {
  const col = cats.map((c, k) => (c === "unassigned" || c === "" ? UNASSIGNED : PALETTE[k % PALETTE.length]));
  const rgba = new Uint8Array(4 * state.n), counts = new Array(cats.length).fill(0);
  for (let i = 0; i < state.n; i++) { const k = codes[i], [r, g, b] = rgb(col[k] || UNASSIGNED); counts[k]++;
    rgba.set([r, g, b, 220], 4 * i); }
  setColors(rgba); legendCategorical(cats, col, counts);
}
function paintContinuous(values, lo, hi, title) {
  const rgba = new Uint8Array(4 * state.n), span = hi - lo || 1;
  for (let i = 0; i < state.n; i++) { const [r, g, b] = viridis((values[i] - lo) / span); rgba.set([r, g, b, 220], 4 * i); }
  setColors(rgba); legendContinuous(title, lo, hi);
}
async function colorBy(query, title) {
  try {
    const c = await api("/api/color?" + query);
    if (c.kind === "categorical") paintCategorical(decode(c.codes), c.categories);
    else paintContinuous(decode(c.values), c.min, c.max, title || c.gene);
    state.scores = null; state.highlighted = 0;
  } catch (err) { showError(err.message); }
}
$("colorBy").addEventListener("change", (e) => colorBy("obs=" + encodeURIComponent(e.target.value), e.target.value));
$("geneForm").addEventListener("submit", (e) => {
  e.preventDefault(); const g = $("gene").value.trim(); if (g) colorBy("gene=" + encodeURIComponent(g), g);
});

// ------------------------------------------------------------------------------------ search
function histogram(values) {
  const c = $("hist"), ctx = c.getContext("2d"), bins = 40, h = new Array(bins).fill(0);
  let lo = Infinity, hi = -Infinity;
  for (const v of values) if (isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  for (const v of values) if (isFinite(v)) h[Math.min(bins - 1, Math.floor((v - lo) / (hi - lo || 1) * bins))]++;
  const m = Math.max(...h); ctx.clearRect(0, 0, c.width, c.height); ctx.fillStyle = "#4a6fd1";
  h.forEach((v, k) => { const bh = v / m * (c.height - 12); ctx.fillRect(k * c.width / bins, c.height - 12 - bh, c.width / bins - 1, bh); });
  ctx.fillStyle = "#555"; ctx.font = "10px sans-serif"; ctx.fillText(lo.toFixed(2), 0, c.height - 1);
  ctx.fillText(hi.toFixed(2), c.width - 26, c.height - 1); c.hidden = false;
}
$("searchForm").addEventListener("submit", async (e) => {
  e.preventDefault();
  const q = $("query").value.trim(); if (!q) return;
  const btn = $("searchBtn"); busy(btn, true); $("searchStatus").textContent = "searching…";
  const t0 = performance.now();
  try {
    const r = await api("/api/search", { query: q, top: 50 });
    const scores = decode(r.scores); state.scores = scores;
    // the top hits light up (hot colours by score); the rest of the map is greyed
    const sorted = Float32Array.from(scores).filter(isFinite).sort();
    const cut = sorted[Math.max(0, sorted.length - Math.max(r.hits.length, Math.ceil(sorted.length * 0.05)))];
    const hi = sorted[sorted.length - 1], rgba = new Uint8Array(4 * state.n); let lit = 0;
    for (let i = 0; i < state.n; i++) {
      if (scores[i] >= cut) { const t = (scores[i] - cut) / (hi - cut || 1); rgba.set([255, Math.round(200 * (1 - t)), 0, 255], 4 * i); lit++; }
      else rgba.set([205, 205, 205, 150], 4 * i);
    }
    state.highlighted = lit; setColors(rgba);
    state.legend = [`search: ${q}`];
    $("legend").innerHTML = `<div>search: <b>${escapeHtml(q)}</b></div><div><span class="sw" style="background:#ff7800"></span>${lit} best-matching cells</div>`;
    histogram(scores);
    $("hits").innerHTML = r.hits.map(([i, name, s]) => `<li data-i="${i}">${escapeHtml(name)} <span class="muted">${s.toFixed(3)}</span></li>`).join("");
    $("searchStatus").textContent = `${lit} cells lit, ${((performance.now() - t0) / 1000).toFixed(2)} s`;
    state.lastSearchMs = performance.now() - t0;
  } catch (err) { $("searchStatus").textContent = ""; showError(err.message); }
  busy(btn, false);
});
$("hits").addEventListener("click", (e) => { const li = e.target.closest("li"); if (li) selectCell(+li.dataset.i); });

// ------------------------------------------------------------------------------------ annotate
$("annotateBtn").addEventListener("click", async () => {
  const labels = $("labels").value.split(/\n|;/).map((s) => s.trim()).filter(Boolean);
  const descOf = $("descOf").value.trim(), ms = $("minScore").value, truth = $("truth").value;
  const btn = $("annotateBtn"); busy(btn, true); $("annotateStatus").textContent = "annotating…";
  try {
    const r = await api("/api/annotate", { labels, descendants_of: descOf || null,
      min_score: ms === "" ? null : parseFloat(ms), truth: truth || null });
    paintCategorical(decode(r.codes), r.categories);
    $("counts").innerHTML = "<tr><th>label</th><th>cells</th></tr>" +
      r.counts.map(([k, v]) => `<tr><td>${escapeHtml(k)}</td><td>${v}</td></tr>`).join("");
    if (r.confusion) {
      const c = r.confusion;
      $("confusion").innerHTML = `<h3>${escapeHtml(c.truth)} (rows) × predicted</h3><table><tr><th></th>` +
        c.columns.map((x) => `<th>${escapeHtml(x)}</th>`).join("") + "</tr>" +
        c.rows.map((row, i) => `<tr><th>${escapeHtml(row)}</th>` + c.counts[i].map((v) => `<td class="n">${v}</td>`).join("") + "</tr>").join("") + "</table>";
    } else $("confusion").innerHTML = "";
    $("annotateStatus").textContent = `${r.categories.length} labels, ${r.n_unassigned} unassigned`;
  } catch (err) { $("annotateStatus").textContent = ""; showError(err.message); }
  busy(btn, false);
});

// ------------------------------------------------------------------------------------ generate
$("genForm").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("genText").value.trim(), n = parseInt($("genN").value || "20", 10); if (!text) return;
  const btn = $("genBtn"); busy(btn, true);
  try {
    const { job } = await api("/api/generate", { text, n });
    const r = await poll(job, $("genStatus"));
    const raw = decode(r.coords), g = raw.length / 2, xy = new Float32Array(2 * g);
    for (let i = 0; i < g; i++) { const [a, b] = state.norm(raw[2 * i], raw[2 * i + 1]); xy[2 * i] = a; xy[2 * i + 1] = b; }
    state.genXY = xy; state.generated.push({ id: r.id, n: g, text });
    const col = new Uint8Array(4 * g); for (let i = 0; i < g; i++) col.set([0, 0, 0, 255], 4 * i);
    upload(bufGenPos, xy); upload(bufGenCol, col); draw();
    $("genStatus").textContent = `${g} pseudo-cells of “${text}” (black, placed by ${r.placed_by})`;
    const a = $("genDownload"); a.href = `/api/generated/${r.id}.h5ad`; a.hidden = false;
  } catch (err) { $("genStatus").textContent = ""; showError(err.message); }
  busy(btn, false);
});

// ------------------------------------------------------------------------------------ one cell
async function selectCell(i) {
  state.selected = i;
  try {
    const c = await api("/api/cell/" + i);
    $("cellPanel").hidden = false; $("cellTitle").textContent = c.obs_name; $("description").textContent = "";
    $("describeStatus").textContent = "";
    $("cellGenes").innerHTML = c.top_genes.map(([g, v]) => `<tr><td>${escapeHtml(g)}</td><td>${v}</td></tr>`).join("");
    $("cellObs").innerHTML = Object.entries(c.obs).map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(v)}</td></tr>`).join("");
    $("cellLabels").innerHTML = c.top_labels ? "<h3>Top labels</h3>" + c.top_labels.map(([l, s]) =>
      `<div>${escapeHtml(l)} <span class="muted">${s.toFixed(3)}</span></div>`).join("") : "<div class='muted'>annotate to see its top labels</div>";
    draw();
  } catch (err) { showError(err.message); }
}
$("closeCell").addEventListener("click", () => { $("cellPanel").hidden = true; state.selected = -1; });
$("describeBtn").addEventListener("click", async () => {
  const btn = $("describeBtn"); busy(btn, true);
  try {
    const { job } = await api("/api/describe", { cell: state.selected });
    $("description").textContent = await poll(job, $("describeStatus"));
  } catch (err) { $("describeStatus").textContent = ""; showError(err.message); }
  busy(btn, false);
});

// ------------------------------------------------------------------------------------ start
(async function start() {
  const t0 = performance.now();
  try {
    const meta = await api("/api/meta");
    $("info").textContent = `${meta.n_obs.toLocaleString()} cells × ${meta.n_vars.toLocaleString()} genes` +
      (meta.file ? ` · ${meta.file}` : "") + ` · map: ${meta.map}`;
    const cats = meta.columns.filter((c) => c.kind === "categorical");
    $("colorBy").innerHTML = meta.columns.map((c) => `<option>${escapeHtml(c.name)}</option>`).join("");
    $("truth").innerHTML = '<option value="">(none)</option>' + cats.map((c) => `<option>${escapeHtml(c.name)}</option>`).join("");
    if (!meta.has_lm) { $("genBtn").disabled = true; $("describeBtn").disabled = true; }
    if (!initGL()) return;
    const buf = await api("/api/coords");
    setCoords(new Float32Array(buf));
    const first = cats.find((c) => /type|label|cluster/i.test(c.name)) || cats[0];
    if (first) { $("colorBy").value = first.name; await colorBy("obs=" + encodeURIComponent(first.name), first.name); }
    else { const rgba = new Uint8Array(4 * state.n); for (let i = 0; i < state.n; i++) rgba.set([31, 119, 180, 200], 4 * i); setColors(rgba); }
    draw();
    state.firstPaintMs = performance.now() - t0; state.ready = true;
  } catch (err) { showError(err.message); }
})();
