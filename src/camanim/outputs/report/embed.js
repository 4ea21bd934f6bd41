/* camanim embeddings report: the scatter of every layer, the separability curve and the CKA heatmap.
 * Reads the JSON block "embed-data" written by camanim.outputs.report.embed: layouts as little-endian
 * uint16 (L x M x 2, mapped to [-lim, lim]), labels as uint16, CKA as uint8 (0..254 = 0..1, 255 = n/a),
 * the thumbnails' sprite sheet as a data URI. Every text from the bundle goes through textContent. */
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const block = $("embed-data");
  if (!block) return;
  const data = JSON.parse(block.textContent);
  const L = data.layers.length;
  const M = data.n;
  if (L === 0) return;

  function bytes(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  const layoutView = new DataView(bytes(data.layouts).buffer);
  const labels = data.labels ? (() => {
    const v = new DataView(bytes(data.labels).buffer);
    const a = new Uint16Array(M);
    for (let i = 0; i < M; i++) a[i] = v.getUint16(2 * i, true);
    return a;
  })() : null;
  const cka = bytes(data.cka);
  const coords = new Map(); // layer -> Float32Array(2M) in [-1, 1]
  function layout(l) {
    let c = coords.get(l);
    if (!c) {
      c = new Float32Array(2 * M);
      const base = l * M * 2;
      for (let i = 0; i < 2 * M; i++) c[i] = (layoutView.getUint16(2 * (base + i), true) / 65535) * 2 - 1;
      coords.set(l, c);
    }
    return c;
  }
  function fmt(v, digits = 3) {
    return v === null || v === undefined || !Number.isFinite(v) ? "n/a" : v.toFixed(digits);
  }

  // ------------------------------------------------------------------ scatter
  const canvas = $("scatter");
  const ctx = canvas.getContext("2d");
  const state = { layer: 0, shown: null, highlight: null, timer: null, anim: null, hover: -1 };
  const order = Array.from({ length: M }, (_, i) => i);
  for (let i = M - 1; i > 0; i--) { // a fixed shuffle: no class always drawn on top
    const j = (i * 2654435761) % (i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  let size = 0;
  function resize() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(200, Math.round(canvas.getBoundingClientRect().width || 560));
    size = w;
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(w * dpr);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    draw();
  }
  const pad = 10;
  const px = (v) => pad + ((v + 1) / 2) * (size - 2 * pad);
  const py = (v) => pad + ((1 - v) / 2) * (size - 2 * pad);

  function draw() {
    const c = state.shown || layout(state.layer);
    ctx.clearRect(0, 0, size, size);
    const r = M > 3000 ? 1.6 : M > 800 ? 2.3 : 3.2;
    const hl = state.highlight;
    for (const pass of hl === null ? [0] : [1, 0]) {
      for (const i of order) {
        const k = labels ? labels[i] : 0;
        const on = hl === null || k === hl;
        if ((pass === 1) === on) continue; // faded points first, highlighted on top
        ctx.globalAlpha = on ? 0.9 : 0.12;
        ctx.fillStyle = labels ? data.colors[k] : "#2563eb";
        ctx.beginPath();
        ctx.arc(px(c[2 * i]), py(c[2 * i + 1]), r, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
    ctx.globalAlpha = 1;
    if (state.hover >= 0) {
      const i = state.hover;
      ctx.strokeStyle = "#000";
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.arc(px(c[2 * i]), py(c[2 * i + 1]), r + 3, 0, 2 * Math.PI);
      ctx.stroke();
    }
    canvas.dataset.layer = String(state.layer);
  }

  function glide(from, to) { // points move from one layer's layout to the next over 220 ms
    if (state.anim) cancelAnimationFrame(state.anim);
    const a = layout(from);
    const b = layout(to);
    const mix = new Float32Array(2 * M);
    const t0 = performance.now();
    const step = (now) => {
      const t = Math.min(1, (now - t0) / 220);
      const e = t * t * (3 - 2 * t);
      for (let i = 0; i < 2 * M; i++) mix[i] = a[i] + (b[i] - a[i]) * e;
      state.shown = t < 1 ? mix : null;
      draw();
      state.anim = t < 1 ? requestAnimationFrame(step) : null;
    };
    state.anim = requestAnimationFrame(step);
  }

  // hover: the nearest point within 10 px
  const tip = $("tip");
  const thumb = $("tip-thumb");
  const tctx = thumb.getContext("2d");
  tctx.imageSmoothingEnabled = false;
  let sprite = null;
  if (data.sprite) {
    sprite = new Image();
    sprite.src = data.sprite;
  }
  canvas.addEventListener("mousemove", (event) => {
    const box = canvas.getBoundingClientRect();
    const x = event.clientX - box.left;
    const y = event.clientY - box.top;
    const c = layout(state.layer);
    let best = -1;
    let bestD = 100;
    for (let i = 0; i < M; i++) {
      if (state.highlight !== null && labels && labels[i] !== state.highlight) continue;
      const dx = px(c[2 * i]) - x;
      const dy = py(c[2 * i + 1]) - y;
      const d = dx * dx + dy * dy;
      if (d < bestD) { bestD = d; best = i; }
    }
    if (best !== state.hover) { state.hover = best; draw(); }
    if (best < 0) { tip.hidden = true; return; }
    $("tip-id").textContent = data.ids[best] || `image ${best}`;
    $("tip-label").textContent = labels ? `label: ${data.classes[labels[best]]}` : "";
    $("tip-pred").textContent = data.predictions[best] ? `model's top-1: ${data.predictions[best]}` : "";
    tctx.clearRect(0, 0, 96, 96);
    if (sprite && sprite.complete && data.tile > 0) {
      const sx = (best % data.columns) * data.tile;
      const sy = Math.floor(best / data.columns) * data.tile;
      tctx.drawImage(sprite, sx, sy, data.tile, data.tile, 0, 0, 96, 96);
    }
    tip.hidden = false;
    const left = Math.min(x + 14, box.width - tip.offsetWidth - 4);
    tip.style.left = `${Math.max(0, left)}px`;
    tip.style.top = `${Math.max(0, y + 14)}px`;
  });
  canvas.addEventListener("mouseleave", () => {
    tip.hidden = true;
    state.hover = -1;
    draw();
  });

  for (const b of document.querySelectorAll("#legend button")) {
    b.addEventListener("click", () => {
      const k = Number(b.dataset.class);
      state.highlight = state.highlight === k ? null : k;
      for (const o of document.querySelectorAll("#legend button")) {
        o.setAttribute("aria-pressed", String(Number(o.dataset.class) === state.highlight));
      }
      draw();
    });
  }

  // --------------------------------------------------------------- layer info
  function showInfo() {
    const fr = data.layers[state.layer];
    $("layer-pos").textContent = `${state.layer + 1} / ${L}`;
    $("layer-name").textContent = fr.name;
    $("layer-type").textContent = fr.kind && fr.kind !== "spatial" ? `${fr.type} (${fr.kind})` : fr.type;
    $("layer-index").textContent = String(fr.index);
    $("layer-shape").textContent = fr.shape || "n/a";
    $("layer-dims").textContent = `${fr.dim} / ${fr.stored}` + (fr.stored < fr.dim ? " (random projection)" : "");
    if (data.scores) {
      for (const m of ["knn", "probe", "silhouette"]) {
        let text = fmt(data.scores[m][state.layer]);
        if (data.best && data.best[m] === state.layer) text += " (best layer)";
        $(`score-${m}`).textContent = text;
      }
    }
  }

  // ---------------------------------------------------------- separability curve
  const SVG = "http://www.w3.org/2000/svg";
  const curve = $("curve");
  const CW = 900;
  const CH = 260;
  const cp = { l: 48, r: 14, t: 14, b: 34 };
  const cx = (i) => cp.l + (L === 1 ? 0.5 : i / (L - 1)) * (CW - cp.l - cp.r);
  let ylo = 0;
  const cy = (v) => cp.t + ((1 - v) / (1 - ylo)) * (CH - cp.t - cp.b);
  const COLORS = { knn: "#2563eb", probe: "#c2410c", silhouette: "#16a34a" };
  function el(tag, attrs, parent, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    parent.appendChild(e);
    return e;
  }
  function drawCurve() {
    if (!curve || !data.scores) return;
    curve.replaceChildren();
    const sil = data.scores.silhouette.filter((v) => v !== null);
    ylo = Math.min(0, ...sil.map((v) => Math.floor(v * 10) / 10));
    for (let v = ylo; v <= 1.0001; v += 0.2) {
      const y = cy(v);
      el("line", { x1: cp.l, x2: CW - cp.r, y1: y, y2: y, class: Math.abs(v) < 1e-9 ? "axis" : "grid" }, curve);
      el("text", { x: cp.l - 6, y: y + 4, class: "tick", "text-anchor": "end" }, curve, v.toFixed(1));
    }
    el("text", { x: (CW + cp.l) / 2, y: CH - 8, class: "tick", "text-anchor": "middle" }, curve,
      `layer (forward order, 1 to ${L})`);
    if (data.chance !== null && data.chance !== undefined) {
      el("line", { x1: cp.l, x2: CW - cp.r, y1: cy(data.chance), y2: cy(data.chance), class: "chance" }, curve);
    }
    if (data.emerges !== null && data.emerges !== undefined) {
      el("line", { x1: cx(data.emerges), x2: cx(data.emerges), y1: cp.t, y2: CH - cp.b, class: "mark" }, curve);
    }
    for (const m of ["silhouette", "probe", "knn"]) {
      const values = data.scores[m];
      let d = "";
      values.forEach((v, i) => {
        if (v === null) return;
        d += `${d && values[i - 1] !== null ? "L" : "M"}${cx(i).toFixed(1)},${cy(v).toFixed(1)}`;
      });
      el("path", { d, class: "line", stroke: COLORS[m] }, curve);
      if (L <= 200) {
        values.forEach((v, i) => {
          if (v === null) return;
          const c = el("circle", { cx: cx(i), cy: cy(v), r: 2.2, class: "pt", fill: COLORS[m] }, curve);
          c.dataset.layer = String(i);
          el("title", {}, c, `${i + 1}: ${data.layers[i].name}  ${data.titles[m]} ${fmt(v)}`);
        });
      }
    }
    if (data.best && data.best.knn !== null && data.best.knn !== undefined) {
      const b = data.best.knn;
      const v = data.scores.knn[b];
      const R = 8;
      let pts = "";
      for (let k = 0; k < 10; k++) {
        const a = Math.PI / 2 + (k * Math.PI) / 5;
        const rr = k % 2 === 0 ? R : R * 0.45;
        pts += `${(cx(b) + rr * Math.cos(a)).toFixed(1)},${(cy(v) - rr * Math.sin(a)).toFixed(1)} `;
      }
      const s = el("polygon", { points: pts, class: "pt best", fill: COLORS.knn }, curve);
      s.dataset.layer = String(b);
      el("title", {}, s, `best k-NN layer: ${b + 1}. ${data.layers[b].name} (${fmt(v)})`);
    }
    el("line", { id: "curve-cursor", y1: cp.t, y2: CH - cp.b, class: "cursor" }, curve);
    const leg = $("curve-legend");
    leg.replaceChildren();
    for (const m of ["knn", "probe", "silhouette"]) {
      const s = document.createElement("span");
      s.className = `key-${m}`;
      s.textContent = `\u25A0 ${data.titles[m]}   `;
      leg.appendChild(s);
    }
    moveCursor();
  }
  function moveCursor() {
    const c = $("curve-cursor");
    if (!c) return;
    c.setAttribute("x1", cx(state.layer));
    c.setAttribute("x2", cx(state.layer));
  }
  if (curve) {
    curve.addEventListener("click", (event) => {
      let l = Number(event.target.dataset ? event.target.dataset.layer : NaN);
      if (!Number.isInteger(l)) {
        const p = curve.createSVGPoint();
        p.x = event.clientX;
        p.y = event.clientY;
        const at = p.matrixTransform(curve.getScreenCTM().inverse());
        l = Math.round(((at.x - cp.l) / (CW - cp.l - cp.r)) * (L - 1));
      }
      setLayer(l);
    });
  }

  // ------------------------------------------------------------------ CKA heatmap
  const heat = $("cka");
  const hctx = heat.getContext("2d");
  const base = document.createElement("canvas");
  base.width = L;
  base.height = L;
  const bctx = base.getContext("2d");
  const img = bctx.createImageData(L, L);
  const rgb = data.lut.map((h) => [1, 3, 5].map((k) => parseInt(h.slice(k, k + 2), 16)));
  for (let r = 0; r < L; r++) { // row r at the bottom-left origin: layer r on the y axis, drawn upwards
    for (let c = 0; c < L; c++) {
      const q = cka[r * L + c];
      const o = 4 * ((L - 1 - r) * L + c);
      const col = q === 255 ? [200, 200, 200] : rgb[Math.round((q / 254) * 255)];
      img.data[o] = col[0];
      img.data[o + 1] = col[1];
      img.data[o + 2] = col[2];
      img.data[o + 3] = 255;
    }
  }
  bctx.putImageData(img, 0, 0);
  const HS = Math.max(L, 440);
  heat.width = HS;
  heat.height = HS;
  hctx.imageSmoothingEnabled = false;
  function drawHeat() {
    hctx.drawImage(base, 0, 0, HS, HS);
    const cell = HS / L;
    hctx.strokeStyle = "rgba(255,255,255,0.9)";
    hctx.lineWidth = Math.max(1, cell * 0.35);
    const x = (state.layer + 0.5) * cell;
    const y = (L - state.layer - 0.5) * cell;
    hctx.beginPath();
    hctx.moveTo(x, 0);
    hctx.lineTo(x, HS);
    hctx.moveTo(0, y);
    hctx.lineTo(HS, y);
    hctx.stroke();
  }
  function cellAt(event) {
    const box = heat.getBoundingClientRect();
    const c = Math.floor(((event.clientX - box.left) / box.width) * L);
    const r = L - 1 - Math.floor(((event.clientY - box.top) / box.height) * L);
    return [Math.max(0, Math.min(L - 1, r)), Math.max(0, Math.min(L - 1, c))];
  }
  heat.addEventListener("mousemove", (event) => {
    const [r, c] = cellAt(event);
    const q = cka[r * L + c];
    $("cka-note").textContent =
      `${r + 1}. ${data.layers[r].name}  vs  ${c + 1}. ${data.layers[c].name}: CKA ${q === 255 ? "n/a" : (q / 254).toFixed(3)}`;
  });
  heat.addEventListener("click", (event) => setLayer(cellAt(event)[0]));
  const bar = $("cka-bar");
  bar.width = 256;
  bar.height = 1;
  const barCtx = bar.getContext("2d");
  data.lut.forEach((c, i) => {
    barCtx.fillStyle = c;
    barCtx.fillRect(i, 0, 1, 1);
  });

  // -------------------------------------------------------------------- controls
  const slider = $("slider");
  slider.max = String(L - 1);
  function setLayer(l, smooth = true) {
    l = Math.max(0, Math.min(L - 1, l));
    const from = state.layer;
    state.layer = l;
    slider.value = String(l);
    if (smooth && from !== l && Math.abs(from - l) <= 3) glide(from, l);
    else { state.shown = null; draw(); }
    showInfo();
    moveCursor();
    drawHeat();
  }
  function play(on) {
    if (on === (state.timer !== null)) return;
    if (on) {
      if (state.layer === L - 1) setLayer(0, false);
      state.timer = setInterval(() => setLayer(state.layer === L - 1 ? 0 : state.layer + 1), 1000 / data.fps);
    } else {
      clearInterval(state.timer);
      state.timer = null;
    }
    $("play").textContent = on ? "Pause" : "Play";
    $("play").setAttribute("aria-pressed", String(on));
  }
  slider.addEventListener("input", () => setLayer(Number(slider.value)));
  $("play").addEventListener("click", () => play(state.timer === null));
  $("prev").addEventListener("click", () => setLayer(state.layer - 1));
  $("next").addEventListener("click", () => setLayer(state.layer + 1));
  document.addEventListener("keydown", (event) => {
    const tag = event.target.tagName;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || event.altKey || event.ctrlKey || event.metaKey) return;
    const step = { ArrowLeft: -1, ArrowRight: 1, ArrowDown: -1, ArrowUp: 1 }[event.key];
    if (step !== undefined) setLayer(state.layer + step);
    else if (event.key === "Home") setLayer(0, false);
    else if (event.key === "End") setLayer(L - 1, false);
    else if (event.key === " " && tag !== "BUTTON") play(state.timer === null);
    else return;
    event.preventDefault();
  });
  window.addEventListener("resize", resize);

  drawCurve();
  resize();
  setLayer(data.best && Number.isInteger(data.best.knn) ? data.best.knn : L - 1, false);
})();
