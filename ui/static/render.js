// The live render view.  Runs as gr.HTML's js_on_load.  The server sends
// each render as <img data-t="..."> where data-t is the page clock of the
// canvas snapshot it shows; on every new value we compute the
// snapshot-to-render latency and the renders per second, show them, and keep
// them in window.sv2vStats (read by the browser test and the benchmark).
(() => {
  const arrivals = [];
  const stats = { latencies: [], renders: 0 };
  window.sv2vStats = stats;
  const median = (values) => {
    if (!values.length) return NaN;
    const sorted = [...values].sort((a, b) => a - b);
    return sorted[Math.floor(sorted.length / 2)];
  };
  watch("value", () => {
    const image = element.querySelector("img.sv2v-render-img");
    if (!image) return;
    const now = performance.now();
    const stamp = parseFloat(image.dataset.t);
    stats.renders += 1;
    if (stamp > 0) {
      stats.latencies.push(now - stamp);
      if (stats.latencies.length > 1000) stats.latencies.shift();
    }
    arrivals.push(now);
    while (arrivals.length > 1 && now - arrivals[0] > 3000) arrivals.shift();
    const span = (now - arrivals[0]) / 1000;
    const fps = arrivals.length > 1 && span > 0 ? (arrivals.length - 1) / span : 0;
    const recent = stats.latencies.slice(-20);
    const latest = recent.length ? recent[recent.length - 1] : NaN;
    const text = `${fps.toFixed(1)} fps · latency ${isNaN(latest) ? "–" : latest.toFixed(0)} ms` +
      ` (median of last ${recent.length}: ${isNaN(median(recent)) ? "–" : median(recent).toFixed(0)} ms)`;
    element.querySelector(".sv2v-stats").textContent = text;
    element.dataset.renders = String(stats.renders);
  });
})();
