// The live render view.  Runs as gr.HTML's js_on_load.  Renders arrive from
// the fast channel as "sv2v:render" events (from live.js) and from the Gradio
// path as this component's value (JSON: image data URL, t, seq, reply); both
// are decoded off the main thread (createImageBitmap) and handed to the
// <canvas> (no copy), newest first: a render showing an older snapshot than one
// already shown is never drawn.  The stats line shows renders per second,
// snapshot-to-render latency and the channel; window.sv2vStats keeps the
// numbers for the browser test and the benchmark (ui/bench.py).
(() => {
  const canvas = element.querySelector("canvas.sv2v-render-canvas");
  // "bitmaprenderer": a decoded render is handed to the canvas without a copy.
  const ctx = canvas.getContext("bitmaprenderer");
  const statsLine = element.querySelector(".sv2v-stats");
  const messageLine = element.querySelector(".sv2v-message");
  const placeholder = element.querySelector(".sv2v-render-empty");
  const MAX_SAMPLES = 5000;
  const arrivals = [];
  const stats = { latencies: [], samples: [], renders: 0, stale: 0, shownSeq: 0, channel: "gradio", why: "" };
  window.sv2vStats = stats;
  let messageTimer = null;

  const median = (values) => {
    if (!values.length) return NaN;
    const sorted = [...values].sort((a, b) => a - b);
    return sorted[Math.floor(sorted.length / 2)];
  };
  const channelName = () => stats.channel === "ws" ? "WebSocket (binary)" :
    `Gradio events${stats.why ? " — " + stats.why : ""}`;

  let statsShownAt = -Infinity;
  function showStats(force) {
    const now = performance.now();
    if (!force && now - statsShownAt < 250) return;  // text updates cost layout: 4 a second
    statsShownAt = now;
    while (arrivals.length > 1 && now - arrivals[0] > 3000) arrivals.shift();
    const span = (now - arrivals[0]) / 1000;
    const fps = arrivals.length > 1 && span > 0 ? (arrivals.length - 1) / span : 0;
    const recent = stats.latencies.slice(-20);
    const latest = recent.length ? recent[recent.length - 1] : NaN;
    statsLine.textContent = `${fps.toFixed(1)} renders/s · latency ${isNaN(latest) ? "–" : latest.toFixed(0)} ms` +
      ` (median of last ${recent.length}: ${isNaN(median(recent)) ? "–" : median(recent).toFixed(0)} ms)` +
      ` · channel: ${channelName()}`;
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
    const bitmap = await createImageBitmap(render.blob);
    if (render.seq < stats.shownSeq) { stats.stale += 1; bitmap.close(); return; }  // a newer one was drawn meanwhile
    ctx.transferFromImageBitmap(bitmap);
    if (element.dataset.busy) { delete element.dataset.busy; messageLine.textContent = ""; }  // got in
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
    showStats();
  }

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

  watch("value", async () => {
    let value;
    try { value = JSON.parse(props.value || "null"); } catch (error) { return; }
    if (!value) return;
    const receivedAt = performance.now();
    if (value.reply) {
      document.dispatchEvent(new CustomEvent("sv2v:answer", { detail: { reply: value.reply, busy: "busy" in value } }));
    }
    if (value.error) { message(value.error, "busy" in value); return; }
    if (!value.image) return;
    const blob = await (await fetch(value.image)).blob();
    show({ blob, seq: value.seq, reply: value.reply, stamp: value.t, channel: "gradio", receivedAt });
  });
  showStats(true);
  document.dispatchEvent(new CustomEvent("sv2v:hello"));  // the canvas says which channel it uses
})();
