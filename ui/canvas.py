"""The drawing canvas and the live render view, as two `gr.HTML` components.

Both are static HTML templates with their behaviour in static/*.js (run by
gr.HTML's `js_on_load`); their templates never change, so a new value never
re-renders the drawing or the render.

The canvas (static/live.js + static/canvas.js) sends snapshots on one of two
channels and paces them by flow control (see live.js):
- the fast channel (ui.channel): binary JPEG snapshots over a WebSocket,
  renders back the same way, drawn onto the render view's <canvas>;
- the Gradio event path (the fallback, e.g. on ZeroGPU, behind a proxy that
  blocks WebSockets, or forced with the page URL's `?channel=gradio`): the
  snapshot goes into the canvas's value as JSON ({"image": JPEG data URL,
  "t": page clock in ms, "end", "cut", "seq"}) and a custom "snapshot"
  event fires, which the app listens to with `canvas.snapshot(...)`.

The render view's value (Gradio path only) is JSON too: {"image": JPEG data
URL, "t": the page clock of the snapshot shown, "seq": that snapshot's
number, "reply": the snapshot this answers (0: none, a settings change),
and with the compare view on "compare": the render without the bank}, or
{"reply", "error": message} / {"reply", "dropped": true} / {"reply", "busy":
people ahead, "error": message} (every place taken) when there is no render
for it, so the page's flow control always gets its answer.  The answer to a
re-render the page asked for (its "rerender" event) carries the request's
number as "rerender", with a render or without one.  static/render.js
draws renders from both channels in order (never an older one after a
newer one), marks the render's state on it, shows the figures at a glance
(frames per second, delay, steadiness) and keeps the history strip beside
the render (see render.js); the detailed figures have their own component
(`figures_component`, under Advanced).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import gradio as gr

STATIC = Path(__file__).resolve().parent / "static"
DEMO_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "start.png"
# The detailed figures (under Advanced, which Gradio renders only when opened): render.js keeps the
# newest line in window.sv2vFigures and sends each new one as "sv2v:figures".
FIGURES_TEMPLATE = (
    '<div class="sv2v-figures" aria-live="off"></div>'
    '<div class="sv2v-figures-help">latency: from a snapshot to its render on the screen. flicker: how much the '
    'render changes where the drawing did not (mean absolute change, 0-255, over the steady parts of the last 20 '
    'pairs of renders); the compare view shows it with the bank and without.</div>'
)
FIGURES_JS = """
const line = element.querySelector(".sv2v-figures");
line.textContent = window.sv2vFigures || "no renders yet";
const show = (event) => {
  if (line.isConnected) line.textContent = event.detail;
  else document.removeEventListener("sv2v:figures", show);  // the section was closed: a new line comes with it
};
document.addEventListener("sv2v:figures", show);
"""


def _static(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def _data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def canvas_component(channel_path: str, size: int, quality: float, *, control: bool = False) -> gr.HTML:
    """The 512×512 drawing canvas with its toolbar; fires "snapshot" on the Gradio path.

    channel_path: the fast channel's path relative to the page ("" when the
    server has none); size, quality: snapshots on the Gradio path are JPEGs
    of size×size at this quality (the fast channel's server says its own);
    control: the app has a ControlNet: send the ink layer with each snapshot.
    """
    return gr.HTML(
        value="",
        html_template=_static("canvas.html"),
        css_template=_static("canvas.css"),
        js_on_load=_static("live.js") + "\n" + _static("canvas.js"),
        elem_id="sv2v-canvas",
        demo_image=_data_url(DEMO_IMAGE, "image/png"),
        channel_path=channel_path,
        snapshot_size=size,
        snapshot_quality=quality,
        control=control,
    )


def settings_js(fields: tuple[str, ...], *, rerender: bool = True) -> str:
    """A browser-only event handler (`js=` of a Gradio event with no Python function) that hands the
    page's settings controls, in the order `fields`, to static/live.js, which sends them on the fast
    channel (as ui.wire's settings message) now and on every (re)connect; with `rerender`, it also asks
    live.js to re-render the drawing with them once the controls settle."""
    names = ", ".join(fields)
    ask = " document.dispatchEvent(new CustomEvent('sv2v:rerender'));" if rerender else ""
    return (f"({names}) => {{ const settings = {{{names}}}; window.sv2vSettings = settings; "
            f"document.dispatchEvent(new CustomEvent('sv2v:settings', {{ detail: settings }}));{ask} }}")


def render_component() -> gr.HTML:
    """The live render (a <canvas>; two while comparing) with its state mark, history and figures."""
    return gr.HTML(
        value="",
        html_template=_static("render.html"),
        css_template=_static("render.css"),
        js_on_load=_static("render.js"),
        elem_id="sv2v-render",
    )


def figures_component() -> gr.HTML:
    """The detailed figures line (renders per second, latency, flicker, the channel), fed by render.js."""
    return gr.HTML(value="", html_template=FIGURES_TEMPLATE, js_on_load=FIGURES_JS, elem_id="sv2v-figures")


def _jpeg_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def render_value(jpeg: bytes, stamp: float, seq: int, reply: int, *, compare: bytes = b"", rerender: int = 0) -> str:
    """The render view's value for one frame rendered on the Gradio path (compare: the same frame
    without the bank; rerender: the number of the re-render this answers)."""
    value = {"image": _jpeg_url(jpeg), "t": float(stamp), "seq": int(seq), "reply": int(reply)}
    if compare:
        value["compare"] = _jpeg_url(compare)
    if rerender:
        value["rerender"] = int(rerender)
    return json.dumps(value)


def no_render_value(reply: int, error: str | None = None, *, rerender: int = 0) -> str:
    """The render view's value when snapshot `reply` (or re-render `rerender`) got no render: an error,
    or dropped for a newer one."""
    value = {"reply": int(reply), "error": error} if error else {"reply": int(reply), "dropped": True}
    if rerender:
        value["rerender"] = int(rerender)
    return json.dumps(value)


def busy_value(reply: int, ahead: int, message: str) -> str:
    """The render view's value when snapshot `reply` was refused because every place is taken."""
    return json.dumps({"reply": int(reply), "busy": int(ahead), "error": message})
