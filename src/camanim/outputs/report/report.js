/* camanim report: the layer-by-layer viewer and the ybROAD curve.
 * Reads two JSON blocks written by camanim.report: "report-data" (layers, ranges, ROAD) and
 * "report-frames" (per method and normalisation, sprite sheets of overlay tiles as data URIs).
 * Every text from the bundle goes through textContent, never innerHTML. */
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const dataBlock = $("report-data");
  if (!dataBlock || !$("view")) return;
  const data = JSON.parse(dataBlock.textContent);
  const framesBlock = $("report-frames");
  const sprites = framesBlock && framesBlock.textContent.trim() ? JSON.parse(framesBlock.textContent) : {};
  const n = data.frames.length;
  const [tileH, tileW] = data.tile;
  const state = { frame: data.start, method: data.methods[0], norm: data.norms[0], timer: null };

  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  canvas.width = tileW;
  canvas.height = tileH;
  const slider = $("slider");
  slider.max = String(n - 1);

  // ------------------------------------------------------------------ frames
  const sheets = new Map(); // "method|norm|k" -> Image, decoded on first use
  function sheet(method, norm, k) {
    const key = `${method}|${norm}|${k}`;
    let img = sheets.get(key);
    if (!img) {
      img = new Image();
      img.addEventListener("load", draw);
      img.addEventListener("error", () => console.error(`cannot decode frame sheet ${key}`));
      img.src = sprites[method][norm][k];
      sheets.set(key, img);
    }
    return img;
  }

  // a volume's slices are drawn by volume.js (window.CamanimVolume), from the maps themselves
  const volume = data.volume && window.CamanimVolume ? window.CamanimVolume(data, canvas, () => state) : null;

  function draw() {
    if (volume) {
      volume.draw();
      return;
    }
    const f = state.frame;
    const img = sheet(state.method, state.norm, Math.floor(f / data.perSheet));
    if (!img.complete || img.naturalWidth === 0) return; // drawn by the load listener
    const cell = f % data.perSheet;
    const sx = (cell % data.columns) * tileW;
    const sy = Math.floor(cell / data.columns) * tileH;
    ctx.drawImage(img, sx, sy, tileW, tileH, 0, 0, tileW, tileH);
    canvas.dataset.shown = `${state.method}|${state.norm}|${f}`;
  }

  // -------------------------------------------------------------- layer info
  function fmt(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return "n/a";
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3);
    return String(Number(v.toPrecision(4)));
  }

  function showInfo() {
    const f = state.frame;
    const fr = data.frames[f];
    const m = state.method;
    $("layer-pos").textContent = `${f + 1} / ${n}`;
    $("layer-name").textContent = fr.name;
    $("layer-type").textContent = fr.kind === "spatial" ? fr.type : `${fr.type} (${fr.kind})`;
    $("layer-index").textContent = String(fr.index);
    $("layer-size").textContent = fr.map_size;
    $("layer-params").textContent = fr.params === null ? "n/a" : fr.params.toLocaleString("en-US");
    const raw = data.raw[m][f];
    $("layer-raw").textContent = `[${fmt(raw[0])}, ${fmt(raw[1])}]`;
    const r = data.ranges[m][state.norm][f];
    $("layer-scale").textContent = `[${fmt(r[0])}, ${fmt(r[1])}] (${data.normTitles[state.norm]})`;
    $("cbar-lo").textContent = fmt(r[0]);
    $("cbar-hi").textContent = fmt(r[1]);
    const road = data.road[m];
    let roadText = "not computed";
    if (road) {
      roadText = fmt(road[f]);
      if (data.roadBest[m] === f) roadText += " (best layer: max ybROAD)";
    }
    $("layer-road").textContent = roadText;
    const flags = (data.flags[m] || {})[f];
    $("layer-flags").textContent = flags ? flags.join(", ") : "none";
  }

  // ------------------------------------------------------------ ybROAD curve
  const SVG = "http://www.w3.org/2000/svg";
  const W = 800;
  const H = 220;
  const pad = { l: 56, r: 14, t: 14, b: 30 };
  const svg = $("ybroad");
  const xOf = (i) => pad.l + (n === 1 ? 0.5 : i / (n - 1)) * (W - pad.l - pad.r);

  function el(tag, attrs, parent, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    parent.appendChild(e);
    return e;
  }

  function drawCurve() {
    svg.replaceChildren();
    const values = data.road[state.method];
    const note = $("ybroad-note");
    if (!values) {
      note.textContent = `No ROAD scores for ${state.method} in this bundle (run camanim road).`;
      svg.classList.add("empty");
      return;
    }
    svg.classList.remove("empty");
    const finite = values.filter((v) => v !== null);
    let lo = Math.min(0, ...finite);
    let hi = Math.max(0, ...finite);
    if (hi === lo) hi = lo + 1;
    const yOf = (v) => pad.t + ((hi - v) / (hi - lo)) * (H - pad.t - pad.b);
    el("line", { x1: pad.l, x2: W - pad.r, y1: yOf(0), y2: yOf(0), class: "axis" }, svg);
    el("line", { x1: pad.l, x2: pad.l, y1: pad.t, y2: H - pad.b, class: "axis" }, svg);
    for (const v of [lo, hi]) {
      el("text", { x: pad.l - 6, y: yOf(v) + 4, class: "tick", "text-anchor": "end" }, svg, fmt(v));
    }
    el("text", { x: pad.l - 6, y: yOf(0) + 4, class: "tick", "text-anchor": "end" }, svg, "0");
    el("text", { x: (W + pad.l) / 2, y: H - 6, class: "tick", "text-anchor": "middle" }, svg,
      `layer (forward order, 1 to ${n})`);
    let d = "";
    values.forEach((v, i) => {
      if (v === null) return;
      d += `${d && values[i - 1] !== null ? "L" : "M"}${xOf(i).toFixed(1)},${yOf(v).toFixed(1)}`;
    });
    el("path", { d, class: "curve" }, svg);
    el("line", { id: "ybroad-cursor", y1: pad.t, y2: H - pad.b, class: "cursor" }, svg);
    const best = data.roadBest[state.method];
    values.forEach((v, i) => {
      if (v === null) return;
      const c = el("circle", { cx: xOf(i), cy: yOf(v), r: i === best ? 6 : 3, class: i === best ? "pt best" : "pt" }, svg);
      c.dataset.frame = String(i);
      el("title", {}, c, `${i + 1}: ${data.frames[i].name}  ROAD ${fmt(v)}`);
    });
    note.textContent = best === null || best === undefined
      ? "Click a point to show that layer."
      : `Best layer (max ybROAD ${fmt(values[best])}): ${best + 1}. ${data.frames[best].name}` +
        (data.roadMean[state.method] === undefined ? "" : `; mean layer-wise ROAD ${fmt(data.roadMean[state.method])}`) +
        ". Click a point to show that layer.";
    moveCursor();
  }

  function moveCursor() {
    const cursor = $("ybroad-cursor");
    if (!cursor) return;
    const x = xOf(state.frame);
    cursor.setAttribute("x1", x);
    cursor.setAttribute("x2", x);
    for (const c of svg.querySelectorAll("circle.current")) c.classList.remove("current");
    const here = svg.querySelector(`circle[data-frame="${state.frame}"]`);
    if (here) here.classList.add("current");
  }

  svg.addEventListener("click", (event) => {
    if (!data.road[state.method]) return;
    let f = Number(event.target.dataset ? event.target.dataset.frame : NaN);
    if (!Number.isInteger(f)) {
      const p = svg.createSVGPoint();
      p.x = event.clientX;
      p.y = event.clientY;
      const at = p.matrixTransform(svg.getScreenCTM().inverse());
      f = Math.round(((at.x - pad.l) / (W - pad.l - pad.r)) * (n - 1));
    }
    setFrame(f);
  });

  // ---------------------------------------------------------------- controls
  function setFrame(f) {
    state.frame = Math.max(0, Math.min(n - 1, f));
    slider.value = String(state.frame);
    draw();
    showInfo();
    moveCursor();
  }

  function play(on) {
    if (on === (state.timer !== null)) return;
    if (on) {
      if (state.frame === n - 1) setFrame(0);
      state.timer = setInterval(() => setFrame(state.frame === n - 1 ? 0 : state.frame + 1), 1000 / data.fps);
    } else {
      clearInterval(state.timer);
      state.timer = null;
    }
    $("play").textContent = on ? "Pause" : "Play";
    $("play").setAttribute("aria-pressed", String(on));
  }

  function setNorm(norm) {
    state.norm = norm;
    for (const b of document.querySelectorAll("#norms button")) {
      b.setAttribute("aria-pressed", String(b.dataset.norm === norm));
    }
    draw();
    showInfo();
  }

  const methodSelect = $("method");
  for (const m of data.methods) {
    const o = document.createElement("option");
    o.value = m;
    o.textContent = m;
    methodSelect.appendChild(o);
  }
  methodSelect.addEventListener("change", () => {
    state.method = methodSelect.value;
    draw();
    showInfo();
    drawCurve();
  });

  const norms = $("norms");
  for (const nm of data.norms) {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.norm = nm;
    b.textContent = data.normTitles[nm];
    b.addEventListener("click", () => setNorm(nm));
    norms.appendChild(b);
  }

  slider.addEventListener("input", () => setFrame(Number(slider.value)));
  $("play").addEventListener("click", () => play(state.timer === null));
  $("prev").addEventListener("click", () => setFrame(state.frame - 1));
  $("next").addEventListener("click", () => setFrame(state.frame + 1));
  document.addEventListener("keydown", (event) => {
    const tag = event.target.tagName;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || event.altKey || event.ctrlKey || event.metaKey) return;
    const step = { ArrowLeft: -1, ArrowRight: 1, ArrowDown: -1, ArrowUp: 1 }[event.key];
    if (step !== undefined) setFrame(state.frame + step);
    else if (event.key === "Home") setFrame(0);
    else if (event.key === "End") setFrame(n - 1);
    else if (event.key === " " && tag !== "BUTTON") play(state.timer === null);
    else return;
    event.preventDefault();
  });

  // colour bar of the colour map
  const bar = $("cbar");
  const bctx = bar.getContext("2d");
  bar.width = data.lut.length;
  bar.height = 1;
  data.lut.forEach((c, i) => {
    bctx.fillStyle = c;
    bctx.fillRect(i, 0, 1, 1);
  });

  setNorm(state.norm);
  drawCurve();
  setFrame(state.frame);
})();
