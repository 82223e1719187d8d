"""The drawing canvas and the live render view, as two `gr.HTML` components.

The canvas is a static HTML template with its behaviour in
static/canvas.js (run by gr.HTML's `js_on_load`).  Its value is the latest
snapshot as JSON ({"image": PNG data URL, "t": page clock in ms, "end",
"cut", "seq"}) and it fires a custom "snapshot" event, which the app listens
to with `canvas.snapshot(...)` (see ui.layout).  Its template never changes,
so setting the value never re-renders the drawing.

The render view's value is an <img> carrying the render as a JPEG data URL
and the snapshot's page clock, from which static/render.js shows frames per
second and snapshot-to-render latency.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

STATIC = Path(__file__).resolve().parent / "static"
DEMO_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "start.png"
RENDER_PLACEHOLDER = '<div class="sv2v-render-empty">Draw on the canvas: the render appears here.</div>'


def _static(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def _data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def canvas_component() -> gr.HTML:
    """The 512×512 drawing canvas with its toolbar; fires "snapshot"."""
    return gr.HTML(
        value="",
        html_template=_static("canvas.html"),
        css_template=_static("canvas.css"),
        js_on_load=_static("canvas.js"),
        elem_id="sv2v-canvas",
        demo_image=_data_url(DEMO_IMAGE, "image/png"),
    )


def render_component() -> gr.HTML:
    """The live render with its fps / latency readout."""
    return gr.HTML(
        value=RENDER_PLACEHOLDER,
        html_template='<div class="sv2v-stats"></div>${value}',
        css_template=_static("render.css"),
        js_on_load=_static("render.js"),
        elem_id="sv2v-render",
    )


def render_html(image: np.ndarray, stamp: float, seq: int) -> str:
    """The render view's value for one rendered frame."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    source = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    height, width = image.shape[:2]
    return (
        f'<img class="sv2v-render-img" alt="live render" src="{source}" width="{width}" height="{height}"'
        f' data-t="{float(stamp):.3f}" data-seq="{int(seq)}">'
    )

