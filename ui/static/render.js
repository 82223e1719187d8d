// The live render view.  Runs as gr.HTML's js_on_load.  Renders arrive from
// the fast channel as "sv2v:render" events (from live.js) and from the Gradio
// path as this component's value (JSON: image data URL, t, seq, reply); both
// are decoded off the main thread (createImageBitmap) and handed to the
// <canvas> (no copy), newest first: a render showing an older snapshot than one
// already shown is never drawn.  window.sv2vStats keeps the numbers for the
// browser test and the benchmark (bench/live.py).
//
// On the render: a small mark says where it stands ("sv2v:state" from
// live.js): rendering (a newer render is on its way), up to date, or waiting
// for a pause or for the pen to lift (the update policy).  It calms the
// changes: "up to date" shows only once the render has stayed so for
// SETTLED_MS, so a stroke reads as one "rendering", not a blink per render.
//
// Figures: under the render, in words read at a glance, "12 fps · 80 ms delay
// · steady" (frames per second over the last FPS_WINDOW_MS, the median delay
// from a snapshot to its render, and how steady the render is where the
// drawing did not change: the flicker, below STEADY, below SOME_FLICKER or
// above); "idle" when no render came for FPS_WINDOW_MS.  The detailed line
// (renders per second, latency, flicker, the channel) goes to the figures
// component under Advanced (ui/canvas.py: "sv2v:figures", window.sv2vFigures).
//
// Compare (the page's compare view, ui/service.py): a render may come with the
// same snapshot rendered without the feature bank.  Then the view shows both
// side by side, each with its flicker, and a note on what to look for.
//
// Flicker: how much the render changes where the drawing did not.  For each
// pair of consecutive renders, both pictures and the two snapshots they show
// (thumbnails from live.js, "sv2v:sketch") are cut into a THUMB×THUMB grid of
// cells (8×8 pixels of a 512² canvas).  A cell is steady when neither it nor
// any of its 8 neighbours changed in the sketch by more than SKETCH_TOLERANCE
// levels; the pair's flicker is the mean absolute change of the render's
// colour (0-255, over R, G, B) in the steady cells.  Pairs with less than
// MIN_STEADY of the picture steady, and renders of a settings change (the
// picture is meant to change), are left out; the readout is the mean of the
// last FLICKER_PAIRS pairs.  With the echo engine (render = sketch) it is 0
// up to JPEG noise; the compare view shows it with the bank and without.
//
// History: the render at the end of each stroke (a snapshot marked "end":
// pen-up, undo, clear, a new background) and of each settings change goes
// into a strip under the view, newest last, at most MAX_HISTORY of them plus
// the kept ones (at most MAX_KEPT), as the JPEGs the page received.  Clicking
// one shows it over the live view, with Keep (pinned until the page is
// closed), Download PNG, Use as canvas ("sv2v:use-as-canvas" to canvas.js)
// and Back to live in a bar over the render's bottom edge (nothing moves);
// starting a stroke also goes back to live.  The strip runs down the render's
// right side, newest at the bottom.
(() => {
  const canvas = element.querySelector("canvas.sv2v-render-canvas");
  // "bitmaprenderer": a decoded render is handed to the canvas without a copy.
  const ctx = canvas.getContext("bitmaprenderer");
  const compareCtx = element.querySelector("canvas.sv2v-compare-canvas").getContext("bitmaprenderer");
  const box = element.querySelector(".sv2v-render-box");
  const captions = { bank: element.querySelector(".sv2v-caption-bank"), plain: element.querySelector(".sv2v-caption-plain") };
  const mark = element.querySelector(".sv2v-mark");
  const markText = element.querySelector(".sv2v-mark-text");
  const statsLine = element.querySelector(".sv2v-stats");
  const messageLine = element.querySelector(".sv2v-message");
  const placeholder = element.querySelector(".sv2v-render-empty");
  const pastImage = element.querySelector(".sv2v-render-past");
  const pastBar = element.querySelector(".sv2v-past-bar");
  const pastLabel = element.querySelector(".sv2v-past-label");
  const strip = element.querySelector(".sv2v-history");
  const MAX_SAMPLES = 5000;
  const THUMB = 64, SKETCH_TOLERANCE = 3, MIN_STEADY = 0.25, FLICKER_PAIRS = 20;
  const MAX_SKETCHES = 48, MAX_HISTORY = 24, MAX_KEPT = 24;
  const FPS_WINDOW_MS = 3000, SETTLED_MS = 300;
  const STEADY = 2, SOME_FLICKER = 5;  // flicker (0-255) up to which the render reads "steady", "a little flicker"
  const STATE_WORDS = { rendering: "rendering", current: "up to date", pause: "waiting for a pause",
                        penup: "waiting for the pen to lift", "": "" };
  const arrivals = [];
  const stats = { latencies: [], samples: [], renders: 0, stale: 0, shownSeq: 0, channel: "gradio", why: "",
                  flicker: [], compareFlicker: [] };
  window.sv2vStats = stats;
  let messageTimer = null;
  const sketches = new Map();  // seq -> {end, pixels}
  const thumb = new OffscreenCanvas(THUMB, THUMB);
  const thumbCtx = thumb.getContext("2d", { willReadFrequently: true });
  let previous = null;         // {seq, pixels} of the last render drawn
  let previousCompare = null;  // the same for the render without the bank
  let bankName = "the bank";   // the bank's settings, in words, for the compare view's caption
  const history = [];          // {id, blob, url, seq, kept}
  let historyIds = 0;
  let pastShown = null;

  // The flicker of one pair of renders (see above), or null when too little of the picture is steady.
  function flickerBetween(sketchBefore, sketchAfter, renderBefore, renderAfter, side) {
    const cells = side * side;
    const changed = new Uint8Array(cells);
    for (let i = 0; i < cells; i++) {
      const o = 4 * i;
      const d = Math.max(Math.abs(sketchAfter[o] - sketchBefore[o]), Math.abs(sketchAfter[o + 1] - sketchBefore[o + 1]),
                         Math.abs(sketchAfter[o + 2] - sketchBefore[o + 2]));
      if (d > SKETCH_TOLERANCE) changed[i] = 1;
    }
    let sum = 0, steady = 0;
    for (let y = 0; y < side; y++) {
      for (let x = 0; x < side; x++) {
        let near = 0;
        for (let dy = -1; dy <= 1 && !near; dy++) {
          for (let dx = -1; dx <= 1 && !near; dx++) {
            const yy = y + dy, xx = x + dx;
            if (yy >= 0 && yy < side && xx >= 0 && xx < side) near = changed[yy * side + xx];
          }
        }
        if (near) continue;
        const o = 4 * (y * side + x);
        sum += (Math.abs(renderAfter[o] - renderBefore[o]) + Math.abs(renderAfter[o + 1] - renderBefore[o + 1]) +
                Math.abs(renderAfter[o + 2] - renderBefore[o + 2])) / 3;
        steady += 1;
      }
    }
    return steady < MIN_STEADY * cells ? null : sum / steady;
  }
  window.sv2vFlicker = flickerBetween;  // for the browser test

  // The flicker between the last render of a series and this one (`before`: the series' last
  // {seq, pixels}); appended to `values`; returns this render's {seq, pixels}.
  function measureFlicker(render, bitmap, before, values) {
    thumbCtx.drawImage(bitmap, 0, 0, THUMB, THUMB);
    const current = { seq: render.seq, pixels: thumbCtx.getImageData(0, 0, THUMB, THUMB).data };
    if (!before || render.reply === 0) return current;  // a settings change is meant to change the picture
    const a = sketches.get(before.seq), b = sketches.get(current.seq);
    if (!a || !b) return current;
    const value = flickerBetween(a.pixels, b.pixels, before.pixels, current.pixels, THUMB);
    if (value === null) return current;
    values.push(value);
    if (values.length > MAX_SAMPLES) values.shift();
    return current;
  }

  const median = (values) => {
    if (!values.length) return NaN;
    const sorted = [...values].sort((a, b) => a - b);
    return sorted[Math.floor(sorted.length / 2)];
  };
  const channelName = () => stats.channel === "ws" ? "WebSocket (binary)" :
    `Gradio events${stats.why ? " — " + stats.why : ""}`;

  const meanOf = (values) => values.length ? values.reduce((a, b) => a + b, 0) / values.length : NaN;
  const recentFlicker = (values) => meanOf(values.slice(-FLICKER_PAIRS));
  const steadiness = (flicker) => flicker <= STEADY ? "steady" : flicker <= SOME_FLICKER ? "a little flicker" :
    "flickering";
  const flickerWords = (flicker) => isNaN(flicker) ? "flicker –" : `${steadiness(flicker)} (flicker ${flicker.toFixed(1)})`;

  let statsShownAt = -Infinity;
  function showStats(force) {
    const now = performance.now();
    if (!force && now - statsShownAt < 250) return;  // text updates cost layout: 4 a second
    statsShownAt = now;
    while (arrivals.length && now - arrivals[0] > FPS_WINDOW_MS) arrivals.shift();
    const idle = arrivals.length === 0;
    const span = arrivals.length > 1 ? (now - arrivals[0]) / 1000 : 0;
    const fps = span > 0 ? (arrivals.length - 1) / span : 0;
    const recent = stats.latencies.slice(-20);
    const latest = recent.length ? recent[recent.length - 1] : NaN;
    const delay = median(stats.latencies.slice(-10));
    const flicker = recentFlicker(stats.flicker);
    const comparing = box.dataset.compare === "1";
    let glance = "idle";
    if (!idle) {
      const parts = arrivals.length > 1 ? [`${fps.toFixed(0)} fps`] : [];  // one render has no rate yet
      if (!isNaN(delay)) parts.push(`${delay.toFixed(0)} ms delay`);
      if (!isNaN(flicker)) parts.push(comparing ? `with the bank ${steadiness(flicker)}` : steadiness(flicker));
      if (comparing && stats.compareFlicker.length) parts.push(`without ${steadiness(recentFlicker(stats.compareFlicker))}`);
      glance = parts.join(" · ");
    }
    statsLine.textContent = glance;
    element.dataset.figures = glance;
    const compared = comparing ? ` · without the bank: flicker ${isNaN(recentFlicker(stats.compareFlicker)) ? "–" :
      recentFlicker(stats.compareFlicker).toFixed(1)}` : "";
    const detail = `${idle ? "idle" : fps.toFixed(1) + " renders/s"} · latency ${isNaN(latest) ? "–" : latest.toFixed(0)} ms` +
      ` (median of last ${recent.length}: ${isNaN(median(recent)) ? "–" : median(recent).toFixed(0)} ms)` +
      ` · flicker ${isNaN(flicker) ? "–" : flicker.toFixed(1)}${compared}` +
      ` · channel: ${channelName()}`;
    window.sv2vFigures = detail;
    document.dispatchEvent(new CustomEvent("sv2v:figures", { detail }));
    if (comparing) {
      captions.bank.textContent = `with ${bankName}\n${flickerWords(flicker)}`;
      captions.plain.textContent = `without the bank\n${flickerWords(recentFlicker(stats.compareFlicker))}`;
    }
  }

  // -- the mark on the render ----------------------------------------------------------
  let settleMark = null;
  function showState(state) {
    if (settleMark !== null) { clearTimeout(settleMark); settleMark = null; }
    const apply = () => {
      mark.dataset.state = state;
      markText.textContent = STATE_WORDS[state] || "";
      element.dataset.state = state;
    };
    if (state === "current" && mark.dataset.state === "rendering") settleMark = setTimeout(apply, SETTLED_MS);
    else apply();
  }

  async function show(render) {
    try {
      await draw(render);
    } finally {
      document.dispatchEvent(new CustomEvent("sv2v:shown", { detail: { seq: render.seq } }));
    }
  }

  async function draw(render) {
    if (render.seq < stats.shownSeq) { stats.stale += 1; return; }
    const [bitmap, compared] = await Promise.all([createImageBitmap(render.blob),
                                                  render.compare ? createImageBitmap(render.compare) : null]);
    if (render.seq < stats.shownSeq) {  // a newer one was drawn meanwhile
      stats.stale += 1;
      bitmap.close();
      if (compared) compared.close();
      return;
    }
    previous = measureFlicker(render, bitmap, previous, stats.flicker);
    ctx.transferFromImageBitmap(bitmap);
    if (compared) {
      previousCompare = measureFlicker(render, compared, previousCompare, stats.compareFlicker);
      compareCtx.transferFromImageBitmap(compared);
    } else if (box.dataset.compare === "1") {  // compare turned off: its figures start afresh next time
      previousCompare = null;
      stats.compareFlicker.length = 0;
    }
    const toggled = box.dataset.compare !== (compared ? "1" : "");
    box.dataset.compare = compared ? "1" : "";
    if (element.dataset.busy) { delete element.dataset.busy; messageLine.textContent = ""; }  // got in
    remember(render);
    const now = performance.now();
    stats.shownSeq = render.seq;
    stats.renders += 1;
    element.dataset.renders = String(stats.renders);
    element.dataset.seq = String(render.seq);
    placeholder.hidden = true;
    arrivals.push(now);
    if (render.stamp > 0) {
      const latency = now - render.stamp;
      stats.latencies.push(latency);
      const s = render.server;
      stats.samples.push({
        t: now, latency, seq: render.seq, channel: render.channel, display: now - render.receivedAt,
        encode: render.encodeMs,
        transfer: s ? Math.max(0, render.receivedAt - render.sentAt - render.encodeMs - s.total) : NaN,
        decode: s ? s.decode : NaN, wait: s ? s.wait : NaN, model: s ? s.model : NaN,
        serverEncode: s ? s.encode : NaN, server: s ? s.total : NaN,
      });
      if (stats.latencies.length > MAX_SAMPLES) { stats.latencies.shift(); stats.samples.shift(); }
    }
    showStats(toggled);  // the compare view's captions at once
  }

  // -- the history strip ----------------------------------------------------------
  function remember(render) {
    const sketch = sketches.get(render.seq);
    if (!(render.reply === 0 || (sketch && sketch.end))) return;  // mid-stroke renders pass by
    const last = history[history.length - 1];
    if (last && last.seq === render.seq && render.reply !== 0) return;  // the same snapshot again
    historyIds += 1;
    history.push({ id: historyIds, blob: render.blob, url: URL.createObjectURL(render.blob), seq: render.seq,
                   kept: false });
    let loose = history.filter((entry) => !entry.kept).length;
    for (let i = 0; loose > MAX_HISTORY && i < history.length; ) {
      const entry = history[i];
      if (entry.kept || entry === pastShown) { i += 1; continue; }
      URL.revokeObjectURL(entry.url);
      history.splice(i, 1);
      loose -= 1;
    }
    drawStrip();
  }

  function drawStrip() {
    const atEnd = strip.scrollTop + strip.clientHeight >= strip.scrollHeight - 4;
    strip.replaceChildren(...history.map((entry) => {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.id = String(entry.id);
      button.setAttribute("role", "listitem");
      button.title = `render ${entry.id}${entry.kept ? " (kept)" : ""}: click to show it`;
      button.classList.toggle("sv2v-kept", entry.kept);
      button.classList.toggle("sv2v-selected", entry === pastShown);
      const image = document.createElement("img");
      image.src = entry.url;
      image.alt = `render ${entry.id}`;
      button.append(image);
      button.addEventListener("click", () => showPast(entry));
      return button;
    }));
    element.dataset.history = String(history.length);
    element.dataset.kept = String(history.filter((entry) => entry.kept).length);
    if (atEnd) strip.scrollTop = strip.scrollHeight;  // the newest stays in view, unless the artist scrolled up
  }

  function showPast(entry) {
    pastShown = entry;
    pastImage.src = entry.url;
    pastImage.hidden = false;
    pastBar.hidden = false;
    pastLabel.textContent = `Render ${entry.id}${entry.kept ? " (kept)" : ""}`;
    pastBar.querySelector("[data-past='keep']").textContent = entry.kept ? "Unkeep" : "Keep";
    element.dataset.showing = String(entry.id);
    drawStrip();
  }

  function backToLive() {
    if (!pastShown) return;
    pastShown = null;
    pastImage.hidden = true;
    pastImage.removeAttribute("src");
    pastBar.hidden = true;
    element.dataset.showing = "";
    drawStrip();
  }

  async function downloadPng(entry) {
    const bitmap = await createImageBitmap(entry.blob);
    const canvas = document.createElement("canvas");
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
    const png = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    const link = document.createElement("a");
    link.href = URL.createObjectURL(png);
    link.download = `streamv2v-render-${entry.id}.png`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
  }

  const pastActions = {
    keep: (entry) => {
      if (!entry.kept && history.filter((e) => e.kept).length >= MAX_KEPT) {
        message(`${MAX_KEPT} renders are kept already: download and unkeep one first.`);
        return;
      }
      entry.kept = !entry.kept;
      showPast(entry);
    },
    download: downloadPng,
    canvas: (entry) => {
      document.dispatchEvent(new CustomEvent("sv2v:use-as-canvas", { detail: { blob: entry.blob } }));
      backToLive();
    },
    live: backToLive,
  };
  pastBar.querySelectorAll("[data-past]").forEach((button) => button.addEventListener("click", () => {
    if (pastShown) pastActions[button.dataset.past](pastShown);
  }));
  document.addEventListener("sv2v:drawing", backToLive);
  document.addEventListener("sv2v:sketch", (event) => {
    sketches.set(event.detail.seq, event.detail);
    while (sketches.size > MAX_SKETCHES) sketches.delete(sketches.keys().next().value);
  });

  // busy: the server is full (the page asks again every second, so this shows until it gets in)
  function message(text, busy = false) {
    if (busy) element.dataset.busy = "1";
    messageLine.textContent = text;
    if (messageTimer !== null) clearTimeout(messageTimer);
    messageTimer = setTimeout(() => { messageLine.textContent = ""; }, 6000);
  }

  document.addEventListener("sv2v:render", (event) => show(event.detail));
  document.addEventListener("sv2v:channel", (event) => {
    stats.channel = event.detail.channel;
    stats.why = event.detail.why;
    element.dataset.channel = stats.channel;
    showStats(true);
  });
  document.addEventListener("sv2v:message", (event) => message(event.detail.text, event.detail.busy));
  document.addEventListener("sv2v:state", (event) => showState(event.detail.state));
  document.addEventListener("sv2v:settings", (event) => {
    const { bank, ea, ff } = event.detail;
    const parts = [ea ? "EA" : "", ff ? "FF" : ""].filter(Boolean).join("+");
    bankName = bank === "none" ? "the bank off (none)" : `the bank (${bank}${parts ? ", " + parts : ", unused"})`;
  });

  watch("value", async () => {
    let value;
    try { value = JSON.parse(props.value || "null"); } catch (error) { return; }
    if (!value) return;
    const receivedAt = performance.now();
    if (value.reply || value.rerender) {
      document.dispatchEvent(new CustomEvent("sv2v:answer", { detail: { reply: value.reply, rerender: value.rerender,
                                                                         busy: "busy" in value } }));
    }
    if (value.error) { message(value.error, "busy" in value); return; }
    if (!value.image) return;
    const blobOf = async (url) => (await fetch(url)).blob();
    const [blob, compare] = await Promise.all([blobOf(value.image), value.compare ? blobOf(value.compare) : null]);
    show({ blob, compare, seq: value.seq, reply: value.reply, stamp: value.t, channel: "gradio", receivedAt });
  });
  showStats(true);
  setInterval(() => showStats(true), 1000);  // "idle" once renders stop coming
  document.dispatchEvent(new CustomEvent("sv2v:hello"));  // the canvas says which channel it uses
})();
