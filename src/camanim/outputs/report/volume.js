/* camanim report: the slice viewer of volume maps (see camanim.outputs.report.volume).
 * report.js calls window.CamanimVolume(data, canvas, getState) and hands it the drawing: each slice is
 * computed here from the embedded maps (trilinear, align_corners=False, as the frames), scaled by the
 * frame's range (the video's), coloured with the 256-entry table and blended over the picture. */
"use strict";
window.CamanimVolume = (data, canvas, getState) => {
  const $ = (id) => document.getElementById(id);
  const v = data.volume;
  const [D, H, W] = v.grid;
  const LONGEST = 448;
  const PLANES = { axial: 0, coronal: 1, sagittal: 2 };
  const LABELS = { axial: ["A", "P", "R", "L"], coronal: ["S", "I", "R", "L"], sagittal: ["S", "I", "A", "P"] };
  const AXIS = ["z", "y", "x"];
  const names = v.video ? ["axial"] : ["axial", "coronal", "sagittal"];
  const titles = v.video ? { axial: "frame" } : { axial: "axial", coronal: "coronal", sagittal: "sagittal" };
  const slices = { axial: v.point[0], coronal: v.point[1], sagittal: v.point[2] };
  let plane = names.includes(v.plane) ? v.plane : "axial";

  function decode(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  const pixels = decode(v.display);
  const decoded = new Map();
  function map(method, f) {
    const key = `${method}|${f}`;
    if (!decoded.has(key)) {
      const m = v.maps[method][f];
      decoded.set(key, { shape: m.shape, lo: m.lo, hi: m.hi, q: decode(m.data) });
    }
    return decoded.get(key);
  }

  // torch's linear interpolation indices and weights for N outputs from n inputs (align_corners=False)
  function axis(N, n, only) {
    const idx = only === undefined ? [...Array(N).keys()] : [only];
    const i0 = new Int32Array(idx.length);
    const i1 = new Int32Array(idx.length);
    const w = new Float32Array(idx.length);
    idx.forEach((i, k) => {
      let s = ((i + 0.5) * n) / N - 0.5;
      if (s < 0) s = 0;
      const f = Math.min(Math.floor(s), n - 1);
      i0[k] = f;
      i1[k] = Math.min(f + 1, n - 1);
      w[k] = s - f;
    });
    return { i0, i1, w, n: idx.length };
  }

  const planeAxes = { axial: [1, 2], coronal: [0, 2], sagittal: [0, 1] };
  function extent(p) {
    const [a, b] = planeAxes[p];
    return [v.grid[a] * v.spacing[a], v.grid[b] * v.spacing[b]];
  }
  const scale = LONGEST / Math.max(...names.map((p) => Math.max(...extent(p))));

  // the map of frame f at the plane's slice: (rows * cols) values in the map's raw units
  function sample(m, p, index) {
    const [d, h, w] = m.shape;
    const sizes = [d, h, w];
    const axes = [0, 1, 2].map((a) => axis(v.grid[a], sizes[a], a === PLANES[p] ? index : undefined));
    const [ra, ca] = planeAxes[p];
    const R = axes[ra];
    const C = axes[ca];
    const F = axes[PLANES[p]];
    const out = new Float32Array(R.n * C.n);
    const at = (c) => c[0] * h * w + c[1] * w + c[2];
    const coord = [0, 0, 0];
    const span = (m.hi - m.lo) / 255;
    for (let r = 0; r < R.n; r++) {
      for (let c = 0; c < C.n; c++) {
        let acc = 0;
        for (const [fi, fw] of [[F.i0[0], 1 - F.w[0]], [F.i1[0], F.w[0]]]) {
          if (fw === 0) continue;
          for (const [ri, rw] of [[R.i0[r], 1 - R.w[r]], [R.i1[r], R.w[r]]]) {
            if (rw === 0) continue;
            for (const [ci, cw] of [[C.i0[c], 1 - C.w[c]], [C.i1[c], C.w[c]]]) {
              if (cw === 0) continue;
              coord[PLANES[p]] = fi;
              coord[ra] = ri;
              coord[ca] = ci;
              acc += fw * rw * cw * m.q[at(coord)];
            }
          }
        }
        out[r * C.n + c] = m.lo + acc * span;
      }
    }
    return { values: out, rows: R.n, cols: C.n };
  }

  const off = document.createElement("canvas");
  const octx = off.getContext("2d");
  const ctx = canvas.getContext("2d");
  canvas.classList.add("volume");
  const alpha = Math.round(v.alpha * 256);

  function draw() {
    const st = getState();
    const index = slices[plane];
    const m = map(st.method, st.frame);
    const { values, rows, cols } = sample(m, plane, index);
    const [lo, hi] = data.ranges[st.method][st.norm][st.frame];
    const flat = !(hi - lo > 1e-6 * Math.max(Math.abs(lo), Math.abs(hi))) || hi === lo;
    off.width = cols;
    off.height = rows;
    const img = octx.createImageData(cols, rows);
    const [a, b] = planeAxes[plane];
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const coord = [0, 0, 0];
        coord[PLANES[plane]] = index;
        coord[a] = r;
        coord[b] = c;
        const voxel = coord[0] * H * W + coord[1] * W + coord[2];
        let x = flat ? 0 : (values[r * cols + c] - lo) / (hi - lo);
        x = Math.min(1, Math.max(0, Number.isFinite(x) ? x : 0));
        const heat = v.lut[Math.min(255, Math.floor(x * 256))];
        const o = 4 * (r * cols + c);
        for (let k = 0; k < 3; k++) {
          const g = v.colour ? pixels[voxel * 3 + k] : pixels[voxel];
          img.data[o + k] = (heat[k] * alpha + g * (256 - alpha) + 128) >> 8;
        }
        img.data[o + 3] = 255;
      }
    }
    octx.putImageData(img, 0, 0);
    const [eh, ew] = extent(plane);
    const ch = Math.max(8, Math.round(eh * scale));
    const cw = Math.max(8, Math.round(ew * scale));
    if (canvas.width !== cw || canvas.height !== ch) {
      canvas.width = cw;
      canvas.height = ch;
    }
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(off, 0, 0, cw, ch);
    // ticks where the other planes cut, and the orientation labels
    ctx.fillStyle = "#ffffff";
    const t = Math.max(6, Math.round(Math.min(cw, ch) / 20));
    const yCut = ((slices[Object.keys(PLANES)[a]] + 0.5) / v.grid[a]) * ch;
    const xCut = ((slices[Object.keys(PLANES)[b]] + 0.5) / v.grid[b]) * cw;
    if (!v.video) {
      ctx.fillRect(0, yCut - 1, t, 2);
      ctx.fillRect(cw - t, yCut - 1, t, 2);
      ctx.fillRect(xCut - 1, 0, 2, t);
      ctx.fillRect(xCut - 1, ch - t, 2, t);
    }
    if (v.oriented) {
      const [top, bottom, left, right] = LABELS[plane];
      ctx.font = "bold 15px sans-serif";
      ctx.fillStyle = "#ffff5a";
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      ctx.fillText(top, cw / 2, 3);
      ctx.textBaseline = "bottom";
      ctx.fillText(bottom, cw / 2, ch - 3);
      ctx.textBaseline = "middle";
      ctx.textAlign = "left";
      ctx.fillText(left, 4, ch / 2);
      ctx.textAlign = "right";
      ctx.fillText(right, cw - 4, ch / 2);
    }
    const n = v.grid[PLANES[plane]];
    const mm = (index + 0.5) * v.spacing[PLANES[plane]];
    $("slice-label").textContent = v.video
      ? `frame t = ${index} of ${n}`
      : `${titles[plane]} ${AXIS[PLANES[plane]]} = ${index} / ${n - 1} (${mm.toFixed(1)} mm)`;
    canvas.dataset.shown = `${st.method}|${st.norm}|${st.frame}|${plane}|${index}`;
  }

  // ---------------------------------------------------------------- controls
  const slider = $("slice");
  function setPlane(p) {
    plane = p;
    slider.max = String(v.grid[PLANES[p]] - 1);
    slider.value = String(slices[p]);
    for (const btn of document.querySelectorAll("#planes button")) {
      btn.setAttribute("aria-pressed", String(btn.dataset.plane === p));
    }
    draw();
  }
  function setSlice(i) {
    slices[plane] = Math.max(0, Math.min(v.grid[PLANES[plane]] - 1, i));
    slider.value = String(slices[plane]);
    draw();
  }
  for (const p of names) {
    const btn = document.createElement("button");
    btn.type = "button";
    btn.dataset.plane = p;
    btn.textContent = titles[p];
    btn.addEventListener("click", () => setPlane(p));
    $("planes").appendChild(btn);
  }
  slider.addEventListener("input", () => setSlice(Number(slider.value)));
  document.addEventListener("keydown", (event) => {
    const step = { PageUp: 1, PageDown: -1 }[event.key];
    if (step === undefined || event.altKey || event.ctrlKey || event.metaKey) return;
    setSlice(slices[plane] + step);
    event.preventDefault();
  });
  slider.max = String(v.grid[PLANES[plane]] - 1);
  slider.value = String(slices[plane]);
  for (const btn of document.querySelectorAll("#planes button")) {
    btn.setAttribute("aria-pressed", String(btn.dataset.plane === plane));
  }
  return { draw, setPlane, setSlice };
};
