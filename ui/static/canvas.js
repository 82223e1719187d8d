// The drawing canvas.  Runs as gr.HTML's js_on_load (after live.js):
// `element` is the component, `props` its props, `trigger(name)` fires a
// Gradio event.
//
// Two layers are composited into the visible canvas: a background (a colour
// or a start image) and the ink (strokes; the eraser cuts holes in the ink,
// showing the background again).  Every change of the composite is reported
// to live.js (`live.changed(end, cut)`), which decides when to send a
// snapshot: while a stroke is drawn as often as the model keeps up, and
// always once more at the end of the stroke (end) or after an edit that
// replaces the picture (cut: the feature bank no longer describes it).
//
// "Use as canvas" (the render view's history, render.js, fires
// "sv2v:use-as-canvas" with a render's blob): the render becomes the
// background, the ink stays as it is and editable; undo brings the previous
// background back.  The update policy selector (live / on pause / on pen-up)
// is handed to live.js.
//
// The canvas's display box scales with the window (canvas.css); the drawing
// stays SIZE×SIZE, and pointer positions are mapped onto it.  An outline of
// the brush at its size, as it would paint there, follows the pointer.
(() => {
  const SIZE = 512;
  const MAX_HISTORY = 30;

  const view = element.querySelector("canvas.sv2v-canvas");
  const viewCtx = view.getContext("2d");
  const layer = () => {
    const c = document.createElement("canvas");
    c.width = SIZE;
    c.height = SIZE;
    return [c, c.getContext("2d", { willReadFrequently: true })];
  };
  const [ink, inkCtx] = layer();
  const [bg, bgCtx] = layer();
  const colorInput = element.querySelector(".sv2v-color");
  const sizeInput = element.querySelector(".sv2v-size");
  const bgInput = element.querySelector(".sv2v-bg");
  const fileInput = element.querySelector(".sv2v-file");
  const outline = element.querySelector(".sv2v-brush");

  let tool = "brush";
  let drawing = false;
  let last = null;
  const history = [];
  const future = [];

  // -- layers -----------------------------------------------------------
  function compose() {
    viewCtx.globalCompositeOperation = "source-over";
    viewCtx.drawImage(bg, 0, 0);
    viewCtx.drawImage(ink, 0, 0);
  }
  function fillBackground(colour) {
    bgCtx.fillStyle = colour;
    bgCtx.fillRect(0, 0, SIZE, SIZE);
  }
  function current() {
    return { bg: bgCtx.getImageData(0, 0, SIZE, SIZE), ink: inkCtx.getImageData(0, 0, SIZE, SIZE) };
  }
  function restore(saved) {
    bgCtx.putImageData(saved.bg, 0, 0);
    inkCtx.putImageData(saved.ink, 0, 0);
    compose();
  }
  function remember() {
    history.push(current());
    if (history.length > MAX_HISTORY) history.shift();
    future.length = 0;
  }
  function undo() {
    if (!history.length) return;
    future.push(current());
    restore(history.pop());
    send(true, false);
  }
  function redo() {
    if (!future.length) return;
    history.push(current());
    restore(future.pop());
    send(true, false);
  }

  // -- snapshots --------------------------------------------------------
  const live = startLive(view, props, trigger, () => ink);
  const send = (end, cut) => live.changed(end, cut);
  element.sv2vLive = live;  // for tests and the benchmark

  // -- drawing ------------------------------------------------------------
  function point(event) {
    const box = view.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * SIZE) / box.width,
      y: ((event.clientY - box.top) * SIZE) / box.height,
      // Pens report pressure; mouse and touch report 0.5 (or 0) — full width.
      w: event.pointerType === "pen" && event.pressure > 0 ? Math.max(0.15, event.pressure) * 1.6 : 1,
    };
  }
  function line(ctx, a, b, operation) {
    ctx.globalCompositeOperation = operation;
    ctx.strokeStyle = colorInput.value;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = Number(sizeInput.value) * b.w;
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x, b.y);
    ctx.stroke();
  }
  // A piece of stroke into the ink.  A brush stroke is also drawn straight onto the
  // visible canvas (the same as compositing again: "over" is associative), which
  // saves redrawing two full layers per pointer move; the eraser needs compose().
  function segment(a, b) {
    if (tool === "eraser") {
      line(inkCtx, a, b, "destination-out");
      return true;
    }
    line(inkCtx, a, b, "source-over");
    line(viewCtx, a, b, "source-over");
    return false;
  }
  view.addEventListener("pointerdown", (event) => {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    event.preventDefault();
    view.focus();
    view.setPointerCapture(event.pointerId);
    remember();
    drawing = true;
    document.dispatchEvent(new CustomEvent("sv2v:drawing"));  // the render view goes back to live
    last = point(event);
    if (segment(last, last)) compose();
    send(false, false);
  });
  view.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    let recompose = false;
    for (const e of events.length ? events : [event]) {
      const p = point(e);
      recompose = segment(last, p) || recompose;
      last = p;
    }
    if (recompose) compose();
    send(false, false);
  });
  const finish = () => {
    if (!drawing) return;
    drawing = false;
    compose();
    send(true, false);
  };
  view.addEventListener("pointerup", finish);
  view.addEventListener("pointercancel", finish);
  view.addEventListener("contextmenu", (event) => event.preventDefault());

  // -- the brush outline --------------------------------------------------------
  let pointer = null;  // the pointer over the canvas, in display pixels of its box (null: elsewhere)
  function showOutline() {
    if (!pointer) { outline.hidden = true; return; }
    const box = view.getBoundingClientRect();
    const diameter = (Number(sizeInput.value) * box.width) / SIZE;
    outline.hidden = false;
    outline.classList.toggle("sv2v-erasing", tool === "eraser");
    outline.style.width = outline.style.height = `${diameter}px`;
    outline.style.transform = `translate(${pointer.x - diameter / 2}px, ${pointer.y - diameter / 2}px)`;
  }
  view.addEventListener("pointermove", (event) => {
    const box = view.getBoundingClientRect();
    pointer = { x: event.clientX - box.left, y: event.clientY - box.top };
    showOutline();
  });
  view.addEventListener("pointerleave", () => { pointer = null; showOutline(); });
  sizeInput.addEventListener("input", showOutline);

  // -- tools and actions ----------------------------------------------------
  function setTool(name) {
    tool = name;
    element.querySelectorAll("[data-tool]").forEach((b) => b.classList.toggle("sv2v-active", b.dataset.tool === name));
    showOutline();
  }
  function clearAll() {
    remember();
    inkCtx.clearRect(0, 0, SIZE, SIZE);
    fillBackground(bgInput.value);
    compose();
    send(true, true);
  }
  function fill() {
    remember();
    fillBackground(bgInput.value);
    compose();
    send(true, true);
  }
  // A picture as the background (cropped to fill the square); keepInk: the strokes stay on top.
  function startFrom(source, keepInk = false) {
    const image = new Image();
    image.onload = () => {
      remember();
      const scale = Math.max(SIZE / image.width, SIZE / image.height);
      const w = image.width * scale;
      const h = image.height * scale;
      fillBackground("#ffffff");
      bgCtx.drawImage(image, (SIZE - w) / 2, (SIZE - h) / 2, w, h);
      if (!keepInk) inkCtx.clearRect(0, 0, SIZE, SIZE);
      compose();
      send(true, true);
      if (source.startsWith("blob:")) URL.revokeObjectURL(source);
      element.dataset.backgrounds = String(Number(element.dataset.backgrounds || 0) + 1);
    };
    image.onerror = () => alert("That file is not an image the browser can read.");
    image.src = source;
  }
  const actions = {
    undo,
    redo,
    clear: clearAll,
    fill,
    upload: () => fileInput.click(),
    demo: () => props.demo_image && startFrom(props.demo_image),
  };
  element.querySelectorAll("[data-tool]").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
  element.querySelectorAll("[data-action]").forEach((b) => b.addEventListener("click", () => actions[b.dataset.action]()));
  document.addEventListener("sv2v:use-as-canvas", (event) => startFrom(URL.createObjectURL(event.detail.blob), true));
  const policyInputs = element.querySelectorAll("input.sv2v-policy");
  policyInputs.forEach((input) => input.addEventListener("change", () => { if (input.checked) live.setPolicy(input.value); }));
  fileInput.addEventListener("change", () => {
    const file = fileInput.files && fileInput.files[0];
    if (file) startFrom(URL.createObjectURL(file));
    fileInput.value = "";
  });
  document.addEventListener("paste", (event) => {
    const target = event.target;
    if (target && target !== view && target.closest && target.closest("input, textarea, [contenteditable]")) return;
    const item = Array.from(event.clipboardData ? event.clipboardData.items : []).find((i) => i.type.startsWith("image/"));
    if (!item) return;
    event.preventDefault();
    startFrom(URL.createObjectURL(item.getAsFile()));
  });
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target && target !== view && target.closest && target.closest("input, textarea, select, [contenteditable]")) return;
    const key = event.key.toLowerCase();
    const mod = event.ctrlKey || event.metaKey;
    let handled = true;
    if (mod && key === "z") (event.shiftKey ? redo : undo)();
    else if (mod && key === "y") redo();
    else if (mod) handled = false;
    else if (key === "b") setTool("brush");
    else if (key === "e") setTool("eraser");
    else if (key === "f") fill();
    else if (key === "[") { sizeInput.value = String(Math.max(1, Number(sizeInput.value) - 2)); showOutline(); }
    else if (key === "]") { sizeInput.value = String(Math.min(96, Number(sizeInput.value) + 2)); showOutline(); }
    else if (key === "delete" && event.shiftKey) clearAll();
    else handled = false;
    if (handled) event.preventDefault();
  });

  fillBackground(bgInput.value);
  compose();
  element.dataset.ready = "1";
})();
