"""StreamV2V Canvas: draw, and watch a StreamV2V render follow live.

Run it:

    python app.py                      # real weights (SV2V_MODEL) on a GPU; built-in model otherwise
    python app.py --model tiny         # the built-in offline model (its pictures are not art)
    python app.py --controlnet lllyasviel/control_v11p_sd15_scribble    # scribble conditioning
    python app.py --model tiny --controlnet tiny                         # offline, not art
    python app.py --ray local          # sessions on CanvasWorker replicas, one per GPU, on Ray Serve
    python app.py --ray auto           # ... on the Ray cluster this host joined (`ray start`)

With --ray ADDRESS (or env SV2V_RAY) the app loads no model: it stays the
page, API, recordings and exports, and each session's stream lives on a
CanvasWorker replica (ui/ray_renderer.py; pip install -r requirements-ray.txt).
Without it nothing of Ray is imported.

Options: --model (or env SV2V_MODEL; default SimianLuo/LCM_Dreamshaper_v7
with the TAESD autoencoder, env SV2V_VAE, on a CUDA GPU, the built-in
'tiny' without one: sv2v_core.loader.choose_model), --lora (an LCM-LoRA
for real weights, env SV2V_LORA), --port, --host (default: Gradio's
rules, GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else 127.0.0.1 and the first
free port from 7860), --size (render side: 512, or 256 with the built-in
model; a smaller --size is faster on a CPU), --render-mode latency|stream (see
ui/service.py for why latency is the default), --idle-timeout (seconds
before an unused session is freed), --max-sessions (artists rendering at
once, default 16; the next ones are told "busy: N people ahead of you"),
--max-batch (frames rendered together per model call, default 8; halved
while batches run out of GPU memory, docs/reliability.md),
--released-memory-gb (a cap on the host memory idle sessions' streams hold),
--allow-origin ORIGIN (pages of this origin may use the fast channel too:
a proxy's or an embedding page's; repeatable),
--no-fast-channel (serve the Gradio page only), --controlnet ID_OR_PATH (an
SD1.5 scribble / line-art ControlNet, or `tiny` with the built-in model: the
canvas's ink layer conditions the render; the page then shows a conditioning
slider and starts at strength 0.6), --control-scale (its default
conditioning scale, 1.0), --compile auto|on|off (auto: compiled serving
graphs on a CUDA GPU, warmed up before the page is served; eager on a CPU
and on ZeroGPU; sv2v_core.loader.choose_serving) and --torch-threads
(the model's CPU threads; default: all cores but one when the app serves a
browser on this machine from a CPU, leaving it a core, else torch's own:
ui.server.model_threads).  A ControlNet that cannot be loaded stops the
start-up with one error line.  SIGTERM or Ctrl+C stops it cleanly, exit 0
(before the server runs: one line, exit 130 or 143); a GPU fault other than
out of memory makes it exit 1, for a restart.  The model is chosen only here, by whoever
runs the app: the page never lets a visitor load a model or file.

The live canvas.  The page sends canvas snapshots while you draw, as fast as
the model takes them (flow control: at most one rendering and one waiting,
the newest drawing wins), over a WebSocket on the same port (/sv2v/ws:
binary JPEG snapshots in, JPEG renders out; ui/channel.py, ui/wire.py), or,
where that cannot connect (ZeroGPU, a proxy without WebSockets, or the page
opened with ?channel=gradio), through Gradio's own events.  The line above
the render says which channel it uses.  Either way the same session layer
(ui/live.py) handles it, and one render scheduler (ui/scheduler.py) runs all
model work on one thread, so every visitor, the API, the webcam and video
tabs share the GPU frame by frame (the whole map: docs/architecture.md).

API (gradio_client; each Client is its own session with its own stream,
feature bank and recording):

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    image_path = client.predict(
        handle_file("sketch.png"),    # image: the canvas picture (PNG/JPEG/WebP, at most 4096 px a side, 8 MB)
        "a watercolor painting",      # prompt: used as given (no style preset), may be empty
        0.4,                          # strength: 0.02-1.0 (SDEdit noise strength)
        4,                            # steps: 1-8 LCM steps (the page offers 1-4)
        0,                            # seed: whole number >= 0
        "dyme",                       # bank: "dyme", "queue" or "none"
        True,                         # ea: extended self-attention over the bank
        True,                         # ff: feature fusion with the bank
        1.0,                          # control_scale: 0-2, with --controlnet only (default: --control-scale)
        api_name="/render")           # -> path of the rendered PNG, render size (see --size)

Every argument after the image has the page's default (prompt "", strength
0.4 or 0.6 with a ControlNet, steps 4, seed 0, "dyme", EA and FF on), so
`client.predict(handle_file("sketch.png"), "a watercolor painting",
api_name="/render")` is enough.
    client.predict(api_name="/reset_bank")                   # -> status text; empties this session's bank
    video = client.predict("mp4", "timelapse", True,          # format "mp4"|"gif", pace "real"|"timelapse",
                           api_name="/export")               # side_by_side -> path of the video file

/render renders the image as the next frame of the session's stream and
returns the converged render of that image (the feature bank carries over
from the session's earlier frames).  /export writes every frame rendered in the
session so far: a time-lapse has one video frame per render (12 fps); real
pace replays them at 25 fps as they happened.  Bad input (unreadable or
oversized image, out-of-range value) raises an error naming the problem; the
session keeps working.  The Video and Webcam tabs are page-only (no endpoint).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import torch

from sv2v_core.config import MAX_CONTROL_SCALE, RENDER_MODES
from sv2v_core.engine import StreamV2V
from sv2v_core.loader import COMPILE_CHOICES, DEFAULT_MODEL, EngineOptions, choose_model
from sv2v_core.loader import load_engine as load_core_engine
from sv2v_core.models import DEFAULT_VAE, ModelLoadError
from ui.channel import origin_of
from ui.gpu import import_spaces, model_device, zero_gpu
from ui.memory import limit_malloc_arenas
from ui.presets import load_presets
from ui.renderer import DeviceFault
from ui.server import create_base_config, create_service, model_threads, serve
from ui.local_renderer import MAX_BATCH

HOW_TO_REAL = (f"To use real weights, run on a GPU with Hub access, or set SV2V_MODEL (default {DEFAULT_MODEL}) "
               "or start it with `python app.py --model HUB_ID_OR_PATH`.")
BUILTIN_NOTICE = f"Running the built-in offline model — its pictures are not art. {HOW_TO_REAL}"
REAL_SIZE = 512
# The built-in model's attention at 512² costs seconds per frame on a CPU, so it renders
# smaller by default; the page shows the render scaled to the canvas.
TINY_SIZE = 256
# Artists rendering at once, by default (how many a GPU serves at a good rate: docs/performance.md).
# On a CPU the built-in model renders a few frames per second in all: set it lower there.
MAX_SESSIONS = 16

log = logging.getLogger("sv2v.app")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="StreamV2V Canvas (Gradio app)")
    parser.add_argument("--model", default=os.environ.get("SV2V_MODEL"),
                        help=f"Hub id, local folder or .safetensors file, or 'tiny' (default: $SV2V_MODEL or {DEFAULT_MODEL})")
    parser.add_argument("--vae", default=os.environ.get("SV2V_VAE"),
                        help=f"tiny autoencoder for real weights (default: $SV2V_VAE or {DEFAULT_VAE})")
    parser.add_argument("--lora", default=os.environ.get("SV2V_LORA"),
                        help="an LCM-LoRA (Hub id or path) on top of real SD1.5 weights (default: $SV2V_LORA, none)")
    parser.add_argument("--host", default=None, help="address to listen on (default: Gradio's, 127.0.0.1 or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or $GRADIO_SERVER_PORT)")
    parser.add_argument("--size", type=int, default=None,
                        help=f"render width and height in pixels (default {REAL_SIZE}; {TINY_SIZE} for the built-in 'tiny')")
    parser.add_argument("--render-mode", choices=RENDER_MODES, default="latency",
                        help="how canvas frames are rendered (see ui/service.py for why latency is the default)")
    parser.add_argument("--idle-timeout", type=float, default=1800.0, help="seconds before an unused session is freed")
    parser.add_argument("--max-sessions", type=int, default=None,
                        help=f"artists rendering at once; more wait in line, and are told so (default {MAX_SESSIONS}; "
                             "with --ray none: each replica's --sessions-per-replica limits it)")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH,
                        help=f"frames rendered together in one model call (default {MAX_BATCH}; lower it if a batch "
                             "does not fit in GPU memory)")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="also accept the fast channel from pages of this origin (scheme://host[:port]: a proxy "
                             "or an embedding page); repeatable (default: the app's own pages only)")
    parser.add_argument("--released-memory-gb", type=float, default=None, metavar="GB",
                        help="at most this much host memory for the streams of idle (released) sessions; past it "
                             "the oldest one's stream is freed and starts afresh (default: no cap)")
    parser.add_argument("--no-fast-channel", dest="fast_channel", action="store_false",
                        help="serve no WebSocket channel: pages use Gradio's events only (it is off on ZeroGPU anyway)")
    parser.add_argument("--controlnet", default=None, metavar="ID_OR_PATH",
                        help="an SD1.5 ControlNet (Hub id, diffusers folder or .safetensors file, e.g. "
                             "lllyasviel/control_v11p_sd15_scribble), or 'tiny' with --model tiny: the canvas's "
                             "ink layer conditions the render")
    parser.add_argument("--control-scale", type=float, default=None,
                        help=f"the ControlNet's default conditioning scale, 0-{MAX_CONTROL_SCALE:g} (default 1.0; "
                             "the page has a slider; needs --controlnet)")
    parser.add_argument("--ray", metavar="ADDRESS", default=os.environ.get("SV2V_RAY") or None,
                        help="render on CanvasWorker replicas on Ray Serve: 'local' (a Ray instance started here), "
                             "'auto' (the cluster this host joined with `ray start`) or ray://HOST:10001 "
                             "(default: $SV2V_RAY; none: render in this process)")
    parser.add_argument("--ray-replicas", type=int, default=None,
                        help="CanvasWorker replicas (default: one per GPU in the Ray cluster)")
    parser.add_argument("--sessions-per-replica", type=int, default=8,
                        help="at most this many sessions per replica (fewer if its GPU memory holds fewer)")
    parser.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                        help="compile the UNet into serving graphs: auto (on a CUDA GPU, warmed up before the page "
                             "is served; not on a CPU nor on ZeroGPU), on (a CPU too, in the background while "
                             "serving eagerly) or off")
    parser.add_argument("--torch-threads", type=int, default=None, metavar="N",
                        help="CPU threads for the model (default: all cores but one on a CPU serving a browser on "
                             "this machine, else torch's own; 0: torch's own)")
    args = parser.parse_args(argv)
    if args.torch_threads is not None and args.torch_threads < 0:
        parser.error("--torch-threads must be 0 (torch's own) or more")
    if args.released_memory_gb is not None and args.released_memory_gb < 0:
        parser.error("--released-memory-gb must be 0 or more")
    for origin in args.allow_origin:
        try:
            origin_of(origin)
        except ValueError as error:
            parser.error(f"--allow-origin: {error}")
    if args.released_memory_gb is not None and args.ray:
        parser.error("--released-memory-gb caps this process's renderer; with --ray the replicas hold the streams")
    if args.control_scale is not None and args.controlnet is None:
        parser.error("--control-scale needs --controlnet (a ControlNet to condition with)")
    return args


def load_engine(model: str | None, vae: str | None, controlnet: str | None = None,
                lora: str | None = None, compile: str = "auto") -> tuple[StreamV2V, str | None]:
    """The engine (sv2v_core.loader), and a notice for the page when it runs a built-in model.

    A model that cannot be loaded falls back to the built-in one; a
    ControlNet that cannot be loaded (or does not fit the model) ends the
    start-up with one error line.  compile: the serving choice's "auto",
    "on" or "off" (sv2v_core.loader.choose_serving; never compiled on ZeroGPU).
    """
    options = EngineOptions(model=model, vae=vae, lora=lora, controlnet=controlnet,
                            device=model_device(), fallback=True, serving=True, compile=compile,
                            zero_gpu=zero_gpu())  # on ZeroGPU the GPU appears inside requests only
    try:
        loaded = load_core_engine(options)
    except ModelLoadError as error:  # a ControlNet's, or the built-in model's own
        raise SystemExit(f"cannot start: {' '.join(str(error).split())}") from None
    log.info("model: %s (%s)", loaded.choice.model, loaded.choice.why)
    if loaded.fell_back:
        log.warning("%s", loaded.fell_back)
    if loaded.fast_path:
        log.info("fast path: %s", loaded.fast_path)
    log.info("serving: %s", loaded.serving.why)
    engine = loaded.engine
    if controlnet is not None:
        log.info("conditioning on the canvas's ink layer with ControlNet %s", controlnet)
    if engine.components.builtin:
        log.warning("running the built-in offline model %r: its pictures are not art. %s", engine.components.name,
                    HOW_TO_REAL)
        return engine, BUILTIN_NOTICE
    log.info("loaded %s on %s", engine.components.name, loaded.device)
    return engine, None


def start_ray(args: argparse.Namespace):
    """(renderer, notice, size): CanvasWorker replicas on the Ray cluster at `args.ray`."""
    try:
        from ui.ray_renderer import WorkerOptions, connect, deploy
    except ImportError as error:
        raise SystemExit(f"cannot start: --ray needs Ray Serve ({error}); pip install -r requirements-ray.txt") from None
    model = choose_model(args.model, cuda=True).model  # the replicas have the GPUs
    size = args.size or (TINY_SIZE if model == "tiny" else REAL_SIZE)
    try:
        base = create_base_config(size, args.render_mode, controlled=args.controlnet is not None,
                                  control_scale=args.control_scale)
        options = WorkerOptions(model=model, vae=args.vae, lora=args.lora, base=base, controlnet=args.controlnet,
                                max_sessions=args.sessions_per_replica, max_batch=args.max_batch,
                                idle_timeout=args.idle_timeout, compile=args.compile)
    except ValueError as error:
        raise SystemExit(f"cannot start: {error}") from error
    connect(args.ray)
    renderer = deploy(options, replicas=args.ray_replicas)
    return renderer, BUILTIN_NOTICE if renderer.builtin else None, size


def app_sessions(args: argparse.Namespace) -> int | None:
    """The app's own limit on artists rendering at once (with --ray the replicas have theirs)."""
    if args.max_sessions is not None:
        return args.max_sessions
    return None if args.ray else MAX_SESSIONS


class Stopped(Exception):
    """SIGTERM or Ctrl+C before the server was running."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _stop_starting(signum, frame) -> None:
    raise Stopped(128 + signum)


def main(argv=None) -> int:
    """Run the app; the exit status: 0 once stopped (SIGTERM, Ctrl+C), 1 after a device fault (so that a
    supervisor restarts it), 130 or 143 when stopped before the server was running."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    # Until the server runs, SIGINT and SIGTERM stop the start-up (ui.server handles them after).
    handlers = {sig: signal.signal(sig, _stop_starting) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args)
    except Stopped as stopped:
        print("stopped before the server was running", file=sys.stderr)
        return stopped.code
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> int:
    limit_malloc_arenas()  # memory stays flat under many sessions' threads (ui/memory.py)
    import_spaces()  # on ZeroGPU, before the model goes to "cuda"
    if zero_gpu():
        log.info("ZeroGPU: model work runs in spaces.GPU calls whose worker keeps the streams (ui/crossing.py); "
                 "no warm-up, no fast channel, no compiling")
    if args.ray:
        engine = None
        renderer, notice, size = start_ray(args)
    else:
        threads = model_threads(args.host, model_device(), args.torch_threads)
        if threads:  # before any thread of the app runs torch
            torch.set_num_threads(threads)
        log.info("model threads: %d", torch.get_num_threads())
        engine, notice = load_engine(args.model, args.vae, args.controlnet, args.lora, args.compile)
        renderer, size = None, args.size or (TINY_SIZE if engine.components.name == "tiny" else REAL_SIZE)
    try:
        service = create_service(engine, size=size, render_mode=args.render_mode, idle_timeout=args.idle_timeout,
                                 max_sessions=app_sessions(args), max_batch=args.max_batch,
                                 control_scale=args.control_scale, renderer=renderer,
                                 released_memory=None if args.released_memory_gb is None
                                 else int(args.released_memory_gb * 2**30))
    except ValueError as error:  # e.g. a --size out of range
        raise SystemExit(f"cannot start: {error}") from error
    try:
        if not zero_gpu():  # on ZeroGPU the GPU exists only inside requests
            try:
                service.warm_up()
            except (ValueError, DeviceFault) as error:  # e.g. a --size the model cannot render, a broken GPU
                raise SystemExit(f"cannot start: {error}") from error
        try:
            serve(service, load_presets(), notice=notice, host=args.host, port=args.port,
                  fast_channel=args.fast_channel, allowed_origins=args.allow_origin)
        except ValueError as error:  # e.g. an --allow-origin that is not an origin
            raise SystemExit(f"cannot start: {error}") from error
    finally:
        service.close()
        if engine is not None:
            engine.close()
    fault = getattr(service.renderer, "device_fault", None)
    if fault is not None:
        log.error("exiting with status 1 after a device fault, for a restart: %s", fault)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
