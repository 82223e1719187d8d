"""The Gradio page, and its events as an adapter over the session layer (ui.live).

`build_app(live, ...)` returns a `gr.Blocks`.  Everything mutable lives in
the `CanvasService` (and its `SessionRegistry`) behind `live`, so two apps
built in one process share nothing.  The live canvas's handlers only turn
widget values into calls on a `LivePage` and its typed replies into
Gradio's outputs: a render for the view; "dropped", "busy" or an error for
the page's flow control; a `gr.Warning` where the last render should stay
in place; `gr.Info` for a notice; a `gr.Error` for the API.  The rest
(reset, export, video) call the service directly.

The page is one screen from 1280×720 up, like a painting app's live
docker: the canvas and the render side by side at the same size (they
scale with the window: PAGE_CSS), the render's history beside it, the
settings an artist changes while drawing in one row under them (subject,
style preset, strength, conditioning with a ControlNet, seed and dice),
the expert ones (bank, EA, FF, steps, reset, the detailed figures) in an
"Advanced" section, and export in its own compact section.

Event wiring:
- canvas "snapshot" (custom gr.HTML event; the Gradio fallback of the fast
  channel, ui.channel) -> render, with trigger_mode="always_last" so a
  snapshot arriving while one renders replaces any waiting one;
- every settings control's change, and page load -> the session's settings
  on the server (for the Gradio path), and in the browser to the fast
  channel, which sends them as its own settings message (static/live.js);
- a settings change however made (the mouse, the keyboard, a number typed,
  a preset, the dice; the subject on Enter) also asks static/live.js for a
  re-render, which it sends once the controls have settled (a slider's
  drag, a preset's several values: one re-render), as the canvas's custom
  "rerender" event -> the newest snapshot rendered again, whatever the
  page's update policy; the answer carries the request's number back;
- page load -> the pop-out view's link (ui.popout) for this session;
- named API endpoints: /render, /reset_bank, /export (see app.py); every
  /render argument after the image, and /export's after side_by_side,
  has the page's default.

With a ControlNet (`service.controlled`) the page shows a conditioning
slider, each preset's strength is raised (ui.settings.preset_strength) and
the canvas sends its ink layer with every snapshot as the control source.
"""

from __future__ import annotations

import html
import logging
import secrets
import uuid

import gradio as gr

from sv2v_core.config import BANK_MODES, MAX_CONTROL_SCALE, StreamConfig

from .canvas import (STATIC, busy_value, canvas_component, figures_component, no_render_value, render_component,
                     render_value, settings_js)
from .channel import PATH as CHANNEL_PATH
from .inputs import load_image_file, snapshot_from_payload
from .live import BusyReply, Dropped, Failed, Live, LivePage, Notice, Pending, RenderReply, Reply
from .popout import PAGE_PATH as VIEW_PATH
from .presets import Preset
from .recording import EXPORT_FORMATS, EXPORT_PACES, MAX_PAUSE_SECONDS
from .service import Rendered
from .settings import PAGE_STEPS, Settings, make_config, preset_strength
from .wire import SETTINGS_FIELDS, SNAPSHOT_QUALITY

# Render events wait on the scheduler, which runs one frame at a time; more
# than one at once lets a waiting event be replaced (always_last) while its
# predecessor renders, and lets other sessions queue their frames meanwhile.
GPU = dict(concurrency_id="gpu", concurrency_limit=8)
# The page's own layout: one screen, the canvas and the render at the same size (ui/static/page.css).
PAGE_CSS = (STATIC / "page.css").read_text(encoding="utf-8")
SEED_RANGE = 2**31  # the dice's seeds: what a person can read and type back
# Hands the page's fast-channel key (a load event's answer) to static/live.js, which waits for it.
CHANNEL_KEY_JS = "(key) => { window.sv2vChannelKey = key; }"

log = logging.getLogger("sv2v.layout")


class RerenderData(gr.EventData):
    """The page's re-render request (the canvas's "rerender" event, static/live.js): `asked`, its
    number, which the answer carries back so the page knows it was answered."""

    def __init__(self, target, data) -> None:
        super().__init__(target, data)
        asked = data.get("id") if isinstance(data, dict) else None
        self.asked = asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else 0


def announced(replies: list[Reply]) -> list[Reply]:
    """Show the notices among `replies` (gr.Info); the others."""
    for reply in replies:
        if isinstance(reply, Notice):
            gr.Info(reply.message)
    return [reply for reply in replies if not isinstance(reply, Notice)]


def shown_or_warned(replies: list[Reply], value_of):
    """`value_of(rendered)` for a render; a refusal is a warning and a dropped render nothing (the last
    render stays in place)."""
    for reply in announced(replies):
        if isinstance(reply, RenderReply):
            return value_of(reply.rendered)
        if isinstance(reply, (Failed, BusyReply)):
            gr.Warning(reply.message)
    return gr.skip()


def header_html(title: str, notice: str | None) -> str:
    """The page's one-line header: the title, what to do, and the notice (the built-in model) if any."""
    notice_html = f'<span id="sv2v-notice">⚠️ {html.escape(notice)}</span>' if notice else ""
    return (f'<div class="sv2v-header"><h1>{html.escape(title)}</h1>'
            '<span class="sv2v-lead">Draw on the left; the render follows live on the right.</span>'
            f'{notice_html}</div>')


def build_app(live: Live, *, notice: str | None = None, title: str = "StreamV2V Canvas",
              fast_channel: bool = True) -> gr.Blocks:
    """The whole page around the session layer `live` (one service, one set of style presets).

    fast_channel: the server serves ui.channel's WebSocket route, so the page
    may use it (it falls back to the Gradio events when it cannot connect).
    """
    service, presets = live.service, live.presets
    preset_names = list(presets)
    default = presets[preset_names[0]]
    controlled = service.controlled

    def strength_of(preset: Preset) -> float:
        return preset_strength(preset, controlled)

    def page_of(request: gr.Request) -> LivePage:
        """The session layer's page for the request's session (an event without one is an error)."""
        try:
            return live.connect(request.session_hash)
        except ValueError:
            raise gr.Error("this request has no session; reload the page") from None

    # -- handlers ---------------------------------------------------------
    def view_value(rendered: Rendered, reply: int, rerender: int = 0) -> str:
        return render_value(rendered.jpeg, rendered.stamp, rendered.seq, reply, compare=rendered.compare_jpeg,
                            rerender=rerender)

    def on_snapshot(payload, subject, preset_name, strength, steps, seed, bank, ea, ff, control_scale, compare,
                    request: gr.Request):
        """Render the canvas snapshot just sent by the page (the Gradio path of the live canvas)."""
        if not payload:
            return gr.skip()
        try:
            message = snapshot_from_payload(payload)
        except ValueError as error:
            gr.Warning(str(error))
            return gr.skip()
        page = page_of(request)
        replies = page.settings(Settings(subject, preset_name, strength, steps, seed, bank, ea, ff, control_scale,
                                         compare))
        if not replies:
            outcome = page.snapshot(message)
            replies = page.answer(outcome) if isinstance(outcome, Pending) else outcome
        value = gr.skip()
        for reply in announced(replies):
            if isinstance(reply, RenderReply):
                value = view_value(reply.rendered, message.seq)
            elif isinstance(reply, Dropped):  # a newer snapshot of this page is on its way
                value = no_render_value(message.seq)
            elif isinstance(reply, BusyReply):  # every place is taken: the page shows it and asks again
                value = busy_value(message.seq, reply.ahead, reply.message)
            elif reply.unreadable:
                gr.Warning(reply.message)
            else:
                value = no_render_value(message.seq, reply.message)
        return value

    def store_settings(subject, preset_name, strength, steps, seed, bank, ea, ff, control_scale, compare,
                       request: gr.Request):
        """Keep the page's settings on the server, for the next frame of either channel."""
        settings = Settings(subject, preset_name, strength, steps, seed, bank, ea, ff, control_scale, compare)
        for reply in page_of(request).settings(settings):
            gr.Warning(reply.message)

    def on_rerender(subject, preset_name, strength, steps, seed, bank, ea, ff, control_scale, compare,
                    asked: RerenderData, request: gr.Request):
        """Re-render the newest snapshot with new settings (the page asked: its "rerender" event); the
        answer names the request, with a render or without one."""
        settings = Settings(subject, preset_name, strength, steps, seed, bank, ea, ff, control_scale, compare)
        page = page_of(request)
        for reply in announced(page.settings(settings) or page.rerender()):
            if isinstance(reply, RenderReply):
                return view_value(reply.rendered, 0, asked.asked)
            if isinstance(reply, (Failed, BusyReply)):
                return no_render_value(0, reply.message, rerender=asked.asked)
        return no_render_value(0, rerender=asked.asked)  # nothing drawn yet, or a newer snapshot replaced it

    def on_preset(preset_name):
        preset = presets.get(preset_name, default)
        return strength_of(preset), preset.steps

    def roll_seed():
        """The dice ("Random seed"): a new random seed, shown in the seed box; a typed seed stays as it is."""
        return secrets.randbelow(SEED_RANGE)

    def view_link(request: gr.Request) -> str:
        """The pop-out view's link for this page's session (its token in the fragment)."""
        token = page_of(request).view_token()
        return (f'<a class="sv2v-popout" href="{VIEW_PATH.lstrip("/")}#{html.escape(token)}" target="_blank" '
                'rel="noopener noreferrer" title="This session\'s live render alone, full-window: for a second '
                'monitor or a streaming tool\'s browser source. Whoever has the link can watch (never draw).">'
                'Pop-out view ↗</a>')

    def channel_key(request: gr.Request) -> str:
        """This page's key for the fast channel (ui.live), which static/live.js sends when connecting."""
        return live.channel_key(page_of(request).session_id)

    def render(image, prompt, strength, steps, seed, bank, ea, ff, control_scale=None, request: gr.Request = None):
        """Render one canvas image for this session; returns the rendered image."""
        if image is None:
            raise gr.Error("no image was given")
        try:
            if control_scale is not None and not controlled and float(control_scale) > 0:
                raise ValueError("this app has no ControlNet: control_scale must be 0 (start it with --controlnet)")
            config = make_config(service.base, prompt=prompt, strength=strength, steps=steps, seed=seed,
                                 bank=bank, ea=ea, ff=ff, control_scale=control_scale if controlled else None)
            frame = load_image_file(image)
            page = page_of(request)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        for reply in page.render(frame, config, end=True):
            if isinstance(reply, RenderReply):
                return reply.rendered.image
            if isinstance(reply, Dropped):
                raise gr.Error("a newer /render call of this session replaced this one")
            if isinstance(reply, (Failed, BusyReply)):
                raise gr.Error(reply.message)
        raise gr.Error("no render")

    def reset_bank(request: gr.Request):
        """Empty this session's feature bank; returns a status line."""
        if service.reset_bank(request.session_hash):
            return "Feature bank emptied: the next frame starts afresh."
        return "Nothing rendered yet: the bank is already empty."

    def export(fmt, pace, side_by_side, keep_pauses=False, request: gr.Request = None):
        """This session's recording as a video file (mp4 or gif)."""
        try:
            path = service.export(request.session_hash, fmt, pace, bool(side_by_side), bool(keep_pauses))
        except (ValueError, OSError) as error:
            # The visitor's to act on (nothing recorded yet, a choice out of range): one line here,
            # the message on the page, no traceback.
            log.info("export for session %s refused: %s", request.session_hash, error)
            raise gr.Error(str(error), print_exception=False) from None
        return str(path)

    def clear_recording(request: gr.Request):
        service.clear_recording(request.session_hash)
        return "Recording cleared.", gr.File(value=None, visible=False)

    def on_webcam(frame, subject, preset_name, strength, steps, seed, bank, ea, ff, control_scale, compare,
                  request: gr.Request):
        if frame is None:
            return gr.skip()
        try:
            # A still camera sends near-identical frames: let the engine re-emit instead of re-render;
            # a camera picture has no ink layer: a ControlNet gets its edges.
            config = live.config(Settings(subject, preset_name, strength, steps, seed, bank, ea, ff, control_scale))
            config = config.replace(similarity_skip=StreamConfig.similarity_skip,
                                    control_image="canny" if controlled else config.control_image)
            page = page_of(request)
        except ValueError as error:
            gr.Warning(str(error))
            return gr.skip()
        return shown_or_warned(page.render(frame, config, end=False), lambda rendered: rendered.image)

    def translate(video, subject, preset_name, strength, steps, seed, bank, ea, ff, control_scale, compare,
                  request: gr.Request, progress=gr.Progress()):
        if not video:
            raise gr.Error("upload a video first")
        try:
            config = live.config(Settings(subject, preset_name, strength, steps, seed, bank, ea, ff, control_scale))
            folder = service.registry.get(request.session_hash).recorder.folder / "videos"
            folder.mkdir(exist_ok=True)
            destination = folder / f"translated-{uuid.uuid4().hex[:12]}.mp4"
            progress(0, desc="Translating")
            service.translate_video(video, config, destination,
                                    lambda done, total: progress((done, max(done, total)), desc="Translating"))
        except (ValueError, OSError) as error:
            raise gr.Error(str(error)) from None
        return str(destination)

    def unload(request: gr.Request):
        service.close_session(request.session_hash)

    # -- the page -----------------------------------------------------------
    # delete_cache: Gradio's copies of renders and exports older than an hour go, checked every 30 min.
    with gr.Blocks(title=title, delete_cache=(1800, 3600)) as demo:
        gr.HTML(header_html(title, notice), elem_id="sv2v-header")
        with gr.Tab("Canvas"):
            with gr.Row(equal_height=False, elem_id="sv2v-workspace"):
                with gr.Column(scale=1, min_width=360):
                    canvas = canvas_component(CHANNEL_PATH.lstrip("/") if fast_channel else "",
                                              service.base.width, SNAPSHOT_QUALITY, control=controlled)
                with gr.Column(scale=1, min_width=360):
                    view = render_component()
                    with gr.Row(elem_id="sv2v-view-bar"):
                        compare = gr.Checkbox(value=False, label="Compare: with and without the bank",
                                              elem_id="sv2v-compare", container=False, scale=0, min_width=260)
                        popout = gr.HTML(elem_id="sv2v-popout")
            with gr.Row(elem_id="sv2v-settings"):
                subject = gr.Textbox(label="Subject (prompt)", placeholder="e.g. a house on a hill at sunset",
                                     max_length=500, scale=3, min_width=200)
                preset = gr.Dropdown(preset_names, value=preset_names[0], label="Style preset", scale=2,
                                     min_width=160)
                strength = gr.Slider(0.05, 1.0, value=strength_of(default), step=0.05, label="Strength", scale=2,
                                     min_width=160)
                control_scale = gr.Slider(0.0, MAX_CONTROL_SCALE, value=service.base.control_scale or 0.0, step=0.05,
                                          label="Conditioning", visible=controlled, scale=2,
                                          min_width=160)
                seed = gr.Number(value=service.base.seed, precision=0, minimum=0, label="Seed", scale=1,
                                 min_width=100)
                dice = gr.Button("Random seed", elem_id="sv2v-dice", scale=0, min_width=110, size="md")
            with gr.Accordion("Advanced: the feature bank, steps, detailed figures", open=False,
                              elem_id="sv2v-advanced"):
                with gr.Row():
                    bank = gr.Radio(list(BANK_MODES), value=service.base.bank.mode, label="Feature bank")
                    ea = gr.Checkbox(value=service.base.bank.extended_attention, label="EA (extended attention)")
                    ff = gr.Checkbox(value=service.base.bank.feature_fusion, label="FF (feature fusion)")
                    steps = gr.Slider(PAGE_STEPS[0], PAGE_STEPS[-1], value=default.steps, step=1, label="Steps")
                    with gr.Column(min_width=160):
                        reset_btn = gr.Button("Reset bank")
                        bank_status = gr.Markdown()
                gr.Markdown("A bank setting re-renders the drawing at once: your last few snapshots replay through "
                            "the stream with the new setting, so the bank fills as it would while you draw.",
                            elem_classes="sv2v-small")
                figures_component()
            with gr.Accordion("Export the render as a video", open=True, elem_id="sv2v-export-section"):
                with gr.Row(equal_height=True):
                    fmt = gr.Radio(list(EXPORT_FORMATS), value="mp4", label="Format", min_width=140)
                    pace = gr.Radio(list(EXPORT_PACES), value="timelapse", label="Pace", min_width=180)
                    with gr.Column(min_width=220):
                        side_by_side = gr.Checkbox(value=True, label="Side by side with the sketch")
                        keep_pauses = gr.Checkbox(value=False, label="Real pace: keep pauses",
                                                  info=f"off: pauses longer than {MAX_PAUSE_SECONDS:g} s are "
                                                       "shortened to it")
                    with gr.Column(min_width=160):
                        export_btn = gr.Button("Export", variant="primary")
                        clear_rec_btn = gr.Button("Clear recording")
                    export_file = gr.File(label="Download", interactive=False, visible=False, elem_id="sv2v-export",
                                          min_width=200)
                export_status = gr.Markdown()
        with gr.Tab("Video"):
            gr.Markdown("Translate a short video (up to 20 s) with the same model and settings as the canvas.")
            with gr.Row():
                video_in = gr.Video(label="Input video", sources=["upload"], elem_id="sv2v-video-in")
                video_out = gr.Video(label="Translated video", interactive=False, elem_id="sv2v-video-out")
            translate_btn = gr.Button("Translate", variant="primary")
        with gr.Tab("Webcam"):
            gr.Markdown("Your webcam, rendered live through your own stream (same settings as the canvas).")
            with gr.Row():
                cam = gr.Image(label="Webcam", sources=["webcam"], streaming=True, type="numpy")
                cam_out = gr.Image(label="Render", interactive=False, streaming=True)
        # Inputs of the /render API only (the page sends its canvas through the snapshot event).
        # Plain types (a File, not an Image; Numbers, not Sliders) so that every value reaches
        # `render` unchecked and a bad one gets a message naming the setting.
        # Their values are the page's defaults, which gradio_client uses for arguments left out.
        api_image = gr.File(type="filepath", file_types=["image"], visible=False, label="image")
        api_prompt = gr.Textbox(value="", visible=False, label="prompt")
        api_strength = gr.Number(value=strength_of(default), visible=False, label="strength")
        api_steps = gr.Number(value=service.base.steps, visible=False, label="steps")
        api_seed = gr.Number(value=service.base.seed, visible=False, label="seed")
        api_bank = gr.Textbox(value=service.base.bank.mode, visible=False, label="bank")
        api_ea = gr.Checkbox(value=service.base.bank.extended_attention, visible=False, label="ea")
        api_ff = gr.Checkbox(value=service.base.bank.feature_fusion, visible=False, label="ff")
        api_control_scale = gr.Number(value=service.base.control_scale or 0.0, visible=False, label="control_scale")
        api_output = gr.Image(type="numpy", format="png", visible=False, label="render")
        api_button = gr.Button(visible=False)

        settings = [subject, preset, strength, steps, seed, bank, ea, ff, control_scale, compare]
        canvas.snapshot(on_snapshot, inputs=[canvas, *settings], outputs=view, trigger_mode="always_last",
                        show_progress="hidden", api_visibility="private", **GPU)
        # The same values, in the browser, for static/live.js; every change but the subject's typing also
        # asks for a re-render (the subject's on Enter), which live.js sends once the controls settle.
        to_page = settings_js(SETTINGS_FIELDS)
        to_page_quietly = settings_js(SETTINGS_FIELDS, rerender=False)
        for control in settings:
            control.change(store_settings, inputs=settings, show_progress="hidden", api_visibility="private",
                           queue=False)
            control.change(None, inputs=settings, js=to_page_quietly if control is subject else to_page,
                           api_visibility="private", queue=False)
        subject.submit(None, inputs=settings, js=to_page, api_visibility="private", queue=False)
        demo.load(store_settings, inputs=settings, show_progress="hidden", api_visibility="private", queue=False)
        demo.load(None, inputs=settings, js=to_page_quietly, api_visibility="private", queue=False)
        canvas.rerender(on_rerender, inputs=settings, outputs=view, trigger_mode="always_last",
                        show_progress="hidden", api_visibility="private", **GPU)
        preset.input(on_preset, inputs=preset, outputs=[strength, steps], api_visibility="private")
        dice.click(roll_seed, outputs=seed, api_visibility="private", queue=False, show_progress="hidden")
        demo.load(view_link, outputs=popout, api_visibility="private", queue=False)
        key = gr.Textbox(visible=False, elem_id="sv2v-channel-key")
        demo.load(channel_key, outputs=key, api_visibility="private", queue=False).then(
            None, inputs=key, js=CHANNEL_KEY_JS, api_visibility="private", queue=False)

        api_button.click(render, inputs=[api_image, api_prompt, api_strength, api_steps, api_seed, api_bank, api_ea, api_ff,
                                         api_control_scale],
                         outputs=api_output, api_name="render", **GPU)
        reset_btn.click(reset_bank, outputs=bank_status, api_name="reset_bank")
        export_btn.click(export, inputs=[fmt, pace, side_by_side, keep_pauses], outputs=export_file,
                         api_name="export").success(lambda: gr.File(visible=True), outputs=export_file,
                                                    api_visibility="private", queue=False)
        clear_rec_btn.click(clear_recording, outputs=[export_status, export_file], api_visibility="private")
        translate_btn.click(translate, inputs=[video_in, *settings], outputs=video_out,
                            api_visibility="private", concurrency_id="video", concurrency_limit=1)
        cam.stream(on_webcam, inputs=[cam, *settings], outputs=cam_out, stream_every=0.15, time_limit=120,
                   api_visibility="private", **GPU)
        demo.unload(unload)
    return demo
