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
number, "reply": the snapshot this answers (0: none, a settings change)}, or
{"reply", "error": message} / {"reply", "dropped": true} / {"reply", "busy":
people ahead, "error": message} (every place taken) when there is no render for it, so the page's flow control always gets its answer.  static/render.js draws renders
from both channels in order (never an older one after a newer one) and
shows renders per second, snapshot-to-render latency, flicker and the
channel, and keeps the history strip under the render (see render.js).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import gradio as gr

STATIC = Path(__file__).resolve().parent / "static"
DEMO_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "start.png"
RENDER_TEMPLATE = (
    '<div class="sv2v-stats" aria-live="polite"></div>'
    '<div class="sv2v-render-box"><canvas class="sv2v-render-canvas" width="512" height="512" role="img"'
    ' aria-label="live render"></canvas>'
    '<div class="sv2v-render-empty">Draw on the canvas: the render appears here.</div>'
    '<img class="sv2v-render-past" alt="a render from the history" hidden></div>'
    '<div class="sv2v-message" role="status"></div>'
    '<div class="sv2v-past-bar" hidden><span class="sv2v-past-label"></span>'
    '<button type="button" data-past="keep">Keep</button>'
    '<button type="button" data-past="download">Download PNG</button>'
    '<button type="button" data-past="canvas" title="Put this render on the canvas as its background; your '
    'strokes stay editable (undo brings the old canvas back)">Use as canvas</button>'
    '<button type="button" data-past="live">Back to live</button></div>'
    '<div class="sv2v-history" role="list" aria-label="Render history (the render at the end of each stroke or '
    'settings change; kept ones stay until you leave)"></div>'
)


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


def settings_js(fields: tuple[str, ...]) -> str:
    """A browser-only event handler (`js=` of a Gradio event with no Python function) that hands the
    page's settings controls, in the order `fields`, to static/live.js, which sends them on the fast
    channel (as ui.wire's settings message) now and on every (re)connect."""
    names = ", ".join(fields)
    return (f"({names}) => {{ const settings = {{{names}}}; window.sv2vSettings = settings; "
            "document.dispatchEvent(new CustomEvent('sv2v:settings', { detail: settings })); }")


def render_component() -> gr.HTML:
    """The live render (a <canvas>) with its renders-per-second / latency / channel readout."""
    return gr.HTML(
        value="",
        html_template=RENDER_TEMPLATE,
        css_template=_static("render.css"),
        js_on_load=_static("render.js"),
        elem_id="sv2v-render",
    )


def render_value(jpeg: bytes, stamp: float, seq: int, reply: int) -> str:
    """The render view's value for one frame rendered on the Gradio path."""
    return json.dumps({"image": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"),
                       "t": float(stamp), "seq": int(seq), "reply": int(reply)})


def no_render_value(reply: int, error: str | None = None) -> str:
    """The render view's value when snapshot `reply` got no render: an error, or dropped for a newer one."""
    return json.dumps({"reply": int(reply), "error": error} if error else {"reply": int(reply), "dropped": True})



def busy_value(reply: int, ahead: int, message: str) -> str:
    """The render view's value when snapshot `reply` was refused because every place is taken."""
    return json.dumps({"reply": int(reply), "busy": int(ahead), "error": message})
