// Live rendering: send canvas snapshots to the server, as fast as the model
// takes them and no faster, and hand the renders to the render view.
//
// Prepended to canvas.js in the canvas component's js_on_load; canvas.js calls
// startLive(...) once and then live.changed(end, cut) whenever the drawing
// changes.  The render view (render.js) draws what arrives; the two talk
// through DOM events on `document`:
//   "sv2v:render"  live -> view  a render to draw: {blob, seq, reply, stamp, channel, ...timings}
//                                (and `compare`: the render without the bank, while comparing)
//   "sv2v:answer"  view -> live  the Gradio path answered snapshot `reply` (`busy`: refused, every place taken),
//                                or the re-render `rerender`
//   "sv2v:state"   live -> view  where the render stands: "rendering" (a newer one is on its way),
//                                "current" (up to date), "pause" / "penup" (the update policy waits for
//                                the drawing to rest / the pen to lift), "" (nothing drawn yet)
//   "sv2v:shown"   view -> live  a render was drawn (or dropped as stale): time for the next snapshot
//   "sv2v:channel" live -> view  which channel is in use, and why (again, with the state, on
//                                "sv2v:hello", which the view sends when it loads: either may load first)
//   "sv2v:message" live -> view  an error about a snapshot, or the busy state, for the person drawing
//   "sv2v:sketch"  live -> view  a snapshot was sent: {seq, end, pixels: a THUMB×THUMB RGBA thumbnail},
//                                for the flicker readout and the history (render.js)
//
// Channels: the fast channel is a WebSocket (ui/channel.py, format in
// ui/wire.py) carrying JPEG snapshots and renders as binary messages; the
// fallback is the Gradio event ("snapshot" -> props.value JSON), used when the
// server has no fast channel (ZeroGPU), when the WebSocket cannot connect, or
// when the page URL says ?channel=gradio.
//
// Flow control: a snapshot is only sent when the drawing changed since the
// last one, never sooner than FLOOR_MS after it, and with at most one
// snapshot unanswered, or two on the fast channel when the model is the
// slow stage (its time per render at least the page's own work per render:
// encoding the snapshot and drawing the render).  Then one renders while the
// next travels and waits on the server, so the model never idles for the
// transfer; the second is timed to reach the server when the model is
// predicted to finish the first (from the model time and the overheads the
// server reports), so it waits as little as possible and shows the freshest
// drawing.  When the page is the slow stage a second snapshot would only
// queue behind the first on the page's own thread.  The end of a stroke
// always sends a final snapshot ("end": the server renders it to convergence).
// When the server is full ("busy: N people ahead of you") the page shows it
// and sends its newest drawing again every BUSY_RETRY_MS until it gets in.
//
// Update policy (live.setPolicy): "live" (the default) sends as described
// above; "pause" sends once the drawing has not changed for PAUSE_MS (the pen
// rests, or was lifted); "penup" sends only the end of a stroke (or an edit:
// undo, clear, a new background), so each stroke renders once.  Settings
// changes re-render the drawing once, whatever the policy: every settings
// change, however made (the mouse, arrow keys, a number typed, a preset, the
// dice), asks for a re-render ("sv2v:rerender", from ui/canvas.py
// settings_js), which goes out as the canvas's "rerender" Gradio event once
// the controls have been still for SETTLE_MS and no pointer button is held
// (a slider's drag, or a preset setting several controls, re-renders once,
// at the end).  Its answer comes back on the Gradio path with its number.
//
// Settings: the page's controls arrive as "sv2v:settings" (and window.sv2vSettings,
// for a listener that starts late) from a browser-only Gradio event
// (ui/canvas.py settings_js); on the fast channel they go to the server as a
// settings message (ui/wire.py) on every (re)connect and whenever they change.
//
// With a ControlNet on the server (props.control) every snapshot carries the
// ink layer alone (`ink()`, given by canvas.js) as white strokes on black:
// the control source, whatever background the canvas has.
function startLive(source, props, trigger, ink) {
  const FLOOR_MS = 10;
  const HEADER = 16;       // snapshot header bytes (ui/wire.py)
  const RENDER_HEADER = 40;
  const MAGIC0 = 0x53, MAGIC1 = 0x56, VERSION = 1;
  const EMA = 0.2;
  const BUSY_RETRY_MS = 1000;
  const PAUSE_MS = 400;
  const SETTLE_MS = 350;           // a settings change re-renders once the controls are still this long
  const RERENDER_TIMEOUT_MS = 60000;  // a re-render with no answer by then no longer counts as on its way
  const THUMB = 64;       // sketch thumbnails for the flicker readout (render.js)
  const POLICIES = ["live", "pause", "penup"];
  const params = new URLSearchParams(window.location.search);
  const forcedGradio = params.get("channel") === "gradio";

  let channel = "gradio";
  let channelWhy = "";
  let ws = null;
  let connectedOnce = false;
  let attempts = 0;
  let size = Number(props.snapshot_size) || 512;
  let quality = Number(props.snapshot_quality) || 0.85;
  let seq = 0;
  let dirty = false, pendingEnd = false, pendingCut = false;
  let timer = null;
  let lastSentAt = -Infinity;
  let busyUntil = 0;                       // predicted time the model is free
  let retryAt = 0;                         // while the server is full: ask again no sooner than this
  // Running averages (ms); each starts at its first sample, so a slow model is known as slow at once.
  const est = { model: 0, pre: 5, post: 5, encode: 3, roundtrip: 200 };
  const sampled = new Set();
  const inflight = new Map();              // seq -> {sentAt, encodeMs, end, cut, channel}
  const scratch = document.createElement("canvas");
  const scratchCtx = scratch.getContext("2d");
  const mask = document.createElement("canvas");     // the ink layer as white on black
  const maskCtx = mask.getContext("2d");
  const white = document.createElement("canvas");    // the ink's shape in white (alpha kept)
  const whiteCtx = white.getContext("2d");
  const thumb = document.createElement("canvas");
  thumb.width = thumb.height = THUMB;
  const thumbCtx = thumb.getContext("2d", { willReadFrequently: true });
  let policy = "live";
  let changedAt = -Infinity;
  let settings = window.sv2vSettings || null;
  let settleTimer = null;                  // a re-render to ask for once the controls settle
  let rerenderAsked = 0;                   // the number of the re-render waiting for its answer (0: none)
  let rerenderIds = 0;
  let pointerHeld = false;
  let renderState = "";

  const emit = (name, detail) => document.dispatchEvent(new CustomEvent(name, { detail }));
  const average = (key, value) => {
    if (!isFinite(value)) return;
    est[key] = sampled.has(key) ? est[key] + EMA * (value - est[key]) : value;
    sampled.add(key);
  };
  const setChannel = (name, why) => {
    channel = name;
    channelWhy = why;
    source.dataset.channel = name;
    emit("sv2v:channel", { channel: name, why });
  };

  // -- sending ---------------------------------------------------------------
  function changed(end, cut) {
    dirty = true;
    pendingEnd = pendingEnd || end;
    pendingCut = pendingCut || cut;
    changedAt = performance.now();
    pump();
  }

  function setPolicy(name) {
    if (!POLICIES.includes(name)) throw new Error(`unknown update policy ${name}`);
    policy = name;
    source.dataset.policy = name;
    pump();  // what the old policy held back goes out now if the new one allows it
  }

  function pump() {
    schedule();
    announceState();
  }

  // Where the render stands, for the mark on it (render.js); sent when it changes.
  function announceState() {
    let next = "current";
    if (inflight.size > 0 || rerenderAsked || settleTimer !== null) next = "rendering";
    else if (dirty && policy === "penup" && !pendingEnd) next = "penup";
    else if (dirty && policy === "pause" && performance.now() < changedAt + PAUSE_MS) next = "pause";
    else if (dirty) next = "rendering";
    if (next === "current" && seq === 0) next = "";  // nothing drawn yet
    if (next === renderState) return;
    renderState = next;
    emit("sv2v:state", { state: next });
  }

  function schedule() {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    if (!dirty || inflight.size >= limit()) return;  // an answer calls pump again
    if (policy === "penup" && !pendingEnd) return;     // the end of the stroke calls pump again
    let at = Math.max(lastSentAt + FLOOR_MS, retryAt);
    if (policy === "pause") at = Math.max(at, changedAt + PAUSE_MS);
    // Aim a little early (transfer and model times vary): a moment's wait beats an idle model.
    if (inflight.size > 0) at = Math.max(at, busyUntil - est.pre - Math.min(0.25 * est.model, 2 * est.pre + 2));
    const wait = at - performance.now();
    if (wait > 0) { timer = setTimeout(pump, wait); return; }
    send();
  }

  // -- re-rendering after a settings change -------------------------------------------
  function askRerender() {
    if (seq === 0) return;  // nothing drawn yet: the first snapshot renders with the new settings
    if (settleTimer !== null) clearTimeout(settleTimer);
    settleTimer = setTimeout(sendRerender, SETTLE_MS);
    announceState();
  }

  function sendRerender() {
    if (pointerHeld) { settleTimer = setTimeout(sendRerender, SETTLE_MS); return; }  // a drag: at its end
    settleTimer = null;
    rerenderIds += 1;
    const asked = rerenderAsked = rerenderIds;
    setTimeout(() => { if (rerenderAsked === asked) { rerenderAsked = 0; announceState(); } }, RERENDER_TIMEOUT_MS);
    trigger("rerender", { id: asked });
    announceState();
  }

  function rerenderAnswered(id) {
    if (id === rerenderAsked) rerenderAsked = 0;  // an older one's answer: the newer is still on its way
    announceState();
  }

  // Two snapshots unanswered only on the fast channel and when the model is the slow stage.
  const limit = () => (channel === "ws" && est.model >= 2 * est.encode ? 2 : 1);

  // The drawing as a JPEG data URL at the render size.  toDataURL is
  // synchronous (1.5-4 ms for 512²); toBlob measured 15 ms here while drawing,
  // its callback waiting for an idle moment.
  function snapshotUrl() {
    let target = source;
    if (size !== source.width) {
      scratch.width = size;
      scratch.height = size;
      scratchCtx.drawImage(source, 0, 0, size, size);
      target = scratch;
    }
    return target.toDataURL("image/jpeg", quality);
  }

  // The ink layer alone at the render size, white strokes on black, as a JPEG data URL.
  function controlUrl() {
    const layer = ink();
    for (const c of [mask, white]) { c.width = size; c.height = size; }
    whiteCtx.drawImage(layer, 0, 0, size, size);
    whiteCtx.globalCompositeOperation = "source-in";
    whiteCtx.fillStyle = "#ffffff";
    whiteCtx.fillRect(0, 0, size, size);
    maskCtx.fillStyle = "#000000";
    maskCtx.fillRect(0, 0, size, size);
    maskCtx.drawImage(white, 0, 0);
    return mask.toDataURL("image/jpeg", quality);
  }

  // A small copy of the snapshot for the render view (flicker readout, history).
  function announce(id, end) {
    thumbCtx.drawImage(source, 0, 0, THUMB, THUMB);
    emit("sv2v:sketch", { seq: id, end, pixels: thumbCtx.getImageData(0, 0, THUMB, THUMB).data });
  }

  // A snapshot message (ui/wire.py): header, then the JPEG bytes of `url`
  // (with a control image: the picture's length, the picture, the control image).
  function snapshotMessage(url, id, stamp, end, cut, control) {
    const bytes = atob(url.slice(url.indexOf(",") + 1));
    const extra = control ? atob(control.slice(control.indexOf(",") + 1)) : null;
    const lead = extra === null ? 0 : 4;
    const buffer = new ArrayBuffer(HEADER + lead + bytes.length + (extra === null ? 0 : extra.length));
    const header = new DataView(buffer);
    header.setUint8(0, MAGIC0); header.setUint8(1, MAGIC1); header.setUint8(2, VERSION);
    header.setUint8(3, (end ? 1 : 0) | (cut ? 2 : 0) | (extra === null ? 0 : 4));
    header.setUint32(4, id, true);
    header.setFloat64(8, stamp, true);
    if (extra !== null) header.setUint32(HEADER, bytes.length, true);
    const body = new Uint8Array(buffer, HEADER + lead);
    for (let i = 0; i < bytes.length; i++) body[i] = bytes.charCodeAt(i);
    if (extra !== null) {
      for (let i = 0; i < extra.length; i++) body[bytes.length + i] = extra.charCodeAt(i);
    }
    return buffer;
  }

  function send() {
    const end = pendingEnd, cut = pendingCut;
    dirty = pendingEnd = pendingCut = false;
    const stamp = performance.now();
    lastSentAt = stamp;
    seq += 1;
    const id = seq;
    source.dataset.seq = String(id);
    const url = snapshotUrl();
    const control = props.control && ink ? controlUrl() : null;
    const entry = { sentAt: stamp, encodeMs: performance.now() - stamp, end, cut, channel };
    average("encode", entry.encodeMs);
    inflight.set(id, entry);
    announce(id, end);
    if (channel === "ws" && ws && ws.readyState === WebSocket.OPEN) {
      ws.send(snapshotMessage(url, id, stamp, end, cut, control));
      // The model takes this one when it is free, after the transfer.
      busyUntil = Math.max(stamp + est.pre, busyUntil) + est.model;
    } else {
      entry.channel = "gradio";
      entry.timeout = setTimeout(() => answered(id), Math.max(2000, 4 * est.roundtrip));
      const message = { image: url, t: stamp, end, cut, seq: id };
      if (control) message.control = control;
      props.value = JSON.stringify(message);
      trigger("snapshot");
    }
    pump();
  }

  // An answer (render, dropped, error or timeout) for snapshot `id`; `next`: send the next one now
  // (false: once the view has drawn this render, "sv2v:shown").
  function answered(id, next = true) {
    const entry = inflight.get(id);
    if (!entry) return null;
    if (entry.timeout) clearTimeout(entry.timeout);
    inflight.delete(id);
    average("roundtrip", performance.now() - entry.sentAt);
    if (next) pump();
    else { setTimeout(pump, 50); announceState(); }  // pump: in case the view never says it has drawn it
    return entry;
  }

  // Snapshot `id` was refused because every place is taken: send the drawing again later.
  function refused(id) {
    const entry = inflight.get(id);
    if (entry) {
      dirty = true;
      pendingEnd = pendingEnd || entry.end;
      pendingCut = pendingCut || entry.cut;
    }
    retryAt = performance.now() + BUSY_RETRY_MS;
    answered(id);
  }

  // -- the fast channel ----------------------------------------------------------
  function sendSettings() {
    if (settings && channel === "ws" && ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "settings", ...settings }));
    }
  }

  function onRender(buffer) {
    const receivedAt = performance.now();
    const view = new DataView(buffer);
    if (buffer.byteLength < RENDER_HEADER || view.getUint8(0) !== MAGIC0 || view.getUint8(1) !== MAGIC1) return;
    const reply = view.getUint32(4, true);
    const server = {
      decode: view.getFloat32(20, true), wait: view.getFloat32(24, true), model: view.getFloat32(28, true),
      encode: view.getFloat32(32, true), total: view.getFloat32(36, true),
    };
    const entry = inflight.get(reply);
    // Flag 2: a comparison render (without the bank) follows the render, which then has its length first.
    const compared = (view.getUint8(3) & 2) === 2;
    const length = compared ? view.getUint32(RENDER_HEADER, true) : buffer.byteLength - RENDER_HEADER;
    const start = RENDER_HEADER + (compared ? 4 : 0);
    const jpeg = (from, bytes) => new Blob([new Uint8Array(buffer, from, bytes)], { type: "image/jpeg" });
    // Draw first: the decode starts off the main thread before the next snapshot is encoded on it.
    emit("sv2v:render", {
      blob: jpeg(start, length), compare: compared ? jpeg(start + length, buffer.byteLength - start - length) : null,
      reply, seq: view.getUint32(8, true), stamp: view.getFloat64(12, true), skipped: (view.getUint8(3) & 1) === 1,
      channel: "ws", receivedAt, encodeMs: entry ? entry.encodeMs : NaN, sentAt: entry ? entry.sentAt : NaN, server,
    });
    if (entry) {
      const roundtrip = receivedAt - entry.sentAt;
      const transfer = Math.max(0, roundtrip - entry.encodeMs - server.total);
      average("model", server.model);
      average("pre", entry.encodeMs + server.decode + transfer / 2);
      average("post", server.encode + transfer / 2);
      // The model finished this one about `post` ago and went on with the next, if one was waiting.
      const finished = receivedAt - est.post;
      busyUntil = finished;
      for (const [id, other] of inflight) {
        if (id !== reply) busyUntil = Math.max(finished, other.sentAt + est.pre) + est.model;
      }
      // With one snapshot at a time the page is the slow stage: draw this render before
      // encoding the next snapshot on the same thread.
      answered(reply, limit() > 1);
    }
  }

  function onText(text) {
    let message;
    try { message = JSON.parse(text); } catch (error) { return; }
    if (message.type === "ready") {
      size = Math.min(source.width, Number(message.width) || size);
      quality = Number(message.quality) || quality;
      connectedOnce = true;
      attempts = 0;
      setChannel("ws", "");
      settings = settings || window.sv2vSettings || null;
      sendSettings();  // before any snapshot: it renders with them
      pump();
    } else if (message.type === "dropped") {
      answered(message.seq);
    } else if (message.type === "busy") {
      refused(message.seq);
      emit("sv2v:message", { text: message.message, busy: true });
    } else if (message.type === "error") {
      if (message.seq !== null && message.seq !== undefined) answered(message.seq);
      emit("sv2v:message", { text: message.message });
    } else if (message.type === "notice") {
      emit("sv2v:message", { text: message.message });
    }
  }

  function requeue() {
    // Snapshots lost with the connection: send the newest drawing again (keeping a stroke end).
    for (const [id, entry] of inflight) {
      if (entry.channel !== "ws") continue;
      inflight.delete(id);
      dirty = true;
      pendingEnd = pendingEnd || entry.end;
      pendingCut = pendingCut || entry.cut;
    }
  }

  function connect() {
    const session = window.__gradio_session_hash__;
    if (!props.channel_path) { setChannel("gradio", "the server has no fast channel"); return; }
    if (forcedGradio) { setChannel("gradio", "forced by ?channel=gradio"); return; }
    // The session's key comes with the page's session (a load event: ui/layout.py): no key, no channel.
    const key = window.sv2vChannelKey;
    if (!session || !key) { setChannel("gradio", "no session id yet"); setTimeout(connect, 500); return; }
    const root = (window.gradio_config && window.gradio_config.root) || window.location.href;
    const url = new URL(props.channel_path, root.endsWith("/") ? root : root + "/");
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.search = "?session=" + encodeURIComponent(session) + "&key=" + encodeURIComponent(key);
    attempts += 1;
    const socket = new WebSocket(url.href);
    socket.binaryType = "arraybuffer";
    ws = socket;
    socket.onmessage = (event) => {
      if (typeof event.data === "string") onText(event.data);
      else onRender(event.data);
    };
    socket.onclose = (event) => {
      if (ws !== socket) return;
      ws = null;
      const why = event.code === 1001 ? "the server is stopping"
        : connectedOnce ? `WebSocket closed (${event.code}); reconnecting` : "WebSocket refused";
      if (event.code === 1001) emit("sv2v:message", { text: "the server is stopping" });
      setChannel("gradio", why);
      requeue();
      pump();
      // Reconnect with backoff; give up after a few failures if it never worked.
      if (connectedOnce || attempts < 3) setTimeout(connect, Math.min(30000, 1000 * 2 ** Math.min(attempts, 5)));
    };
  }

  document.addEventListener("sv2v:answer", (event) => {
    if (event.detail.rerender) rerenderAnswered(event.detail.rerender);
    else (event.detail.busy ? refused : answered)(event.detail.reply);
  });
  document.addEventListener("sv2v:rerender", askRerender);
  document.addEventListener("pointerdown", () => { pointerHeld = true; }, true);
  for (const name of ["pointerup", "pointercancel"]) {
    window.addEventListener(name, () => { pointerHeld = false; }, true);
  }
  document.addEventListener("sv2v:shown", () => pump());
  document.addEventListener("sv2v:hello", () => {
    emit("sv2v:channel", { channel, why: channelWhy });
    emit("sv2v:state", { state: renderState });
  });
  document.addEventListener("sv2v:settings", (event) => { settings = event.detail; sendSettings(); });
  connect();
  return {
    changed,
    setPolicy,
    policy: () => policy,
    renderState: () => renderState,
    // For tests and the benchmark: close the socket as a network failure would.
    dropConnection: () => ws && ws.close(4000, "dropped by the page"),
    state: () => ({ channel, inflight: inflight.size, seq, estimates: { ...est } }),
  };
}
