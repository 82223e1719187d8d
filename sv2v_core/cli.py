"""Command line: `python -m sv2v_core translate|metrics`.

    python -m sv2v_core translate in.mp4 out.mp4 --prompt "a watercolor painting"
    python -m sv2v_core metrics in.mp4 out.mp4 [--clip /path/to/clip]

`translate` renders every input frame (same count, same exact frame rate) and
writes the output atomically: a failed or interrupted run leaves no output
file.  Problems are reported as one line `error: ...` on stderr; the exit
status is 2 for a bad command line or option value, 1 for a failure while
running (unreadable video, unwritable output, model that will not load),
130 for Ctrl-C and 143 for SIGTERM (neither leaves a partial file).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from sv2v_core.config import BANK_MODES, CONTROL_IMAGES, RENDER_MODES, BankConfig, StreamConfig
from sv2v_core.control import CONTROLLED_STRENGTH
from sv2v_core.engine import StreamV2V
from sv2v_core.images import fit_size
from sv2v_core.loader import (
    DEFAULT_MODEL, DEVICES, DTYPES, EngineOptions, choose_model, load_engine, quiet_library_warnings, resolve_device,
)
from sv2v_core.metrics import MetricUnavailable, clip_consistency, compute_warp_error
from sv2v_core.models import DEFAULT_VAE, ModelLoadError
from sv2v_core.video import OUTPUT_EXTENSIONS, VideoError, VideoWriter, read_video

DEFAULT_LONG_SIDE = 512
DEFAULT_STRENGTH = 0.4
DEFAULT_CONTROL_IMAGE = "canny"  # video: edges (a canvas would use "lines")
BUILTIN_NOTES = {
    "tiny": "note: the built-in 'tiny' model runs offline; its pictures are not art.",
    "sd15-random": "note: 'sd15-random' has random weights; its output is noise, useful only to measure speed and memory.",
}
BUILTIN_CONTROLNET_NOTE = "note: the built-in 'tiny' ControlNet runs offline; its pictures are not art either."


class UsageError(Exception):
    """A bad command line or option value (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports problems as one `error:` line, via UsageError."""

    def error(self, message: str):
        raise UsageError(message)


# ---------------------------------------------------------------- translate


def _add_translate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="video file to translate")
    p.add_argument("output", help=f"video file to write ({', '.join(OUTPUT_EXTENSIONS)})")
    p.add_argument("--prompt", default="", help="text prompt")
    p.add_argument("--negative-prompt", default="", help="negative prompt (used only with --guidance > 1)")
    p.add_argument("--model", default=None,
                   help=f"tiny | sd15-random | Hugging Face id | local path (default: {DEFAULT_MODEL} on a CUDA GPU, "
                        "falling back to tiny if it cannot be loaded; tiny without a GPU)")
    p.add_argument("--vae", default=None, help=f"TAESD id or path (default: the model's own / {DEFAULT_VAE})")
    p.add_argument("--lora", default=None, help="LCM-LoRA id or path to apply on top of the model")
    p.add_argument("--width", type=int, default=None,
                   help=f"output width (default: input aspect, long side {DEFAULT_LONG_SIDE}, rounded to the model's size multiple, 64 for SD1.5)")
    p.add_argument("--height", type=int, default=None, help="output height")
    p.add_argument("--strength", type=float, default=None,
                   help=f"SDEdit noise strength (default {DEFAULT_STRENGTH}; {CONTROLLED_STRENGTH} with --controlnet, "
                        "which keeps the composition at higher strengths)")
    p.add_argument("--steps", type=int, default=4, help="LCM denoising steps (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the model's own: no CFG for LCM-LoRA, 8.5 embedded for "
                        "LCM-distilled UNets); above 1 runs classifier-free guidance on a plain UNet")
    p.add_argument("--bank", default="dyme", choices=BANK_MODES, help="feature bank (default dyme)")
    p.add_argument("--bank-size", type=int, default=1, help="frames kept by a queue bank (default 1)")
    p.add_argument("--no-ea", action="store_true", help="disable extended self-attention")
    p.add_argument("--no-ff", action="store_true", help="disable feature fusion")
    p.add_argument("--fusion-alpha", type=float, default=0.75)
    p.add_argument("--fusion-threshold", type=float, default=0.98)
    p.add_argument("--merge-every", type=int, default=4, help="DyMe bank update interval in frames (default 4)")
    p.add_argument("--mode", default="stream", choices=RENDER_MODES, help="stream batch or latency mode")
    p.add_argument("--controlnet", default=None, metavar="ID_OR_PATH",
                   help="condition on each frame's lines or edges with this SD1.5 ControlNet (e.g. a scribble, "
                        "line-art or canny one): Hugging Face id, diffusers folder, .safetensors file, or tiny "
                        "(built in, for --model tiny)")
    p.add_argument("--control-scale", type=float, default=None,
                   help="ControlNet conditioning scale, 0 (off) to 2 (default 1.0; needs --controlnet)")
    p.add_argument("--control-image", default=None, choices=CONTROL_IMAGES,
                   help=f"control image derived from each frame: canny edges (default), lines (a drawing's "
                        f"strokes on its paper colour) or image (the frame as it is); needs --controlnet")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES))
    p.add_argument("--quiet", action="store_true", help="no progress bar or notes")


def _config(args: argparse.Namespace, width: int, height: int) -> StreamConfig:
    """The StreamConfig the options describe; bad values raise UsageError."""
    if args.controlnet is None:
        for flag, value in (("--control-scale", args.control_scale), ("--control-image", args.control_image)):
            if value is not None:
                raise UsageError(f"{flag} needs --controlnet (a ControlNet to condition with)")
    strength = args.strength
    if strength is None:
        strength = DEFAULT_STRENGTH if args.controlnet is None or args.control_scale == 0 else CONTROLLED_STRENGTH
    try:
        bank = BankConfig(
            mode=args.bank,
            size=args.bank_size,
            extended_attention=not args.no_ea,
            feature_fusion=not args.no_ff,
            fusion_alpha=args.fusion_alpha,
            fusion_threshold=args.fusion_threshold,
            merge_every=args.merge_every,
        )
        return StreamConfig(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            width=width,
            height=height,
            strength=strength,
            steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            mode=args.mode,
            bank=bank,
            control_scale=args.control_scale,
            control_image=args.control_image or DEFAULT_CONTROL_IMAGE,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def output_size(in_width: int, in_height: int, width: int | None, height: int | None, multiple: int) -> tuple[int, int]:
    """Render size: the given sides; a missing side follows the input aspect
    (both missing: long side 512); computed sides round to `multiple`."""
    for name, value in (("width", width), ("height", height)):
        if value is not None and value % multiple:
            raise UsageError(f"--{name} must be a multiple of {multiple} for this model, got {value}")

    def rounded(value: float) -> int:
        return max(multiple, math.floor(value / multiple + 0.5) * multiple)

    aspect = in_width / in_height
    if width is None and height is None:
        return fit_size(in_width, in_height, DEFAULT_LONG_SIDE, multiple)
    if width is None:
        return rounded(height * aspect), height
    if height is None:
        return width, rounded(width / aspect)
    return width, height


def run_translate(args: argparse.Namespace) -> int:
    # Check everything cheap before loading a model: options, input, output.
    _config(args, args.width or DEFAULT_LONG_SIDE, args.height or DEFAULT_LONG_SIDE)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    source, output = Path(args.input), Path(args.output)
    if source.exists() and output.exists() and source.samefile(output):
        raise UsageError("the output would overwrite the input; choose another output file")
    frames, info = read_video(source)

    with VideoWriter(output, info.fps) as writer:
        choice = choose_model(args.model, device.type == "cuda")
        notes = [f"model: {choice.model} ({choice.why})"]  # the app logs the same line (loader.choose_model)
        # Nobody named the default model: if it cannot be loaded, the built-in one renders instead.
        loaded = load_engine(EngineOptions(model=choice.model, vae=args.vae, lora=args.lora,
                                           controlnet=args.controlnet, device=device, dtype=args.dtype,
                                           fallback=args.model is None))
        engine: StreamV2V = loaded.engine
        notes += [f"note: {loaded.fell_back}"] if loaded.fell_back else []
        notes += [BUILTIN_NOTES[name] for name in (engine.components.name,) if name in BUILTIN_NOTES]
        notes += [BUILTIN_CONTROLNET_NOTE] if args.controlnet == "tiny" else []
        if notes and not args.quiet:
            print("\n".join(notes), file=sys.stderr)
        try:
            width, height = output_size(info.width, info.height, args.width, args.height, engine.size_multiple)
            state = engine.new_stream(_config(args, width, height))
            given = 0

            def counted():
                nonlocal given
                for frame in frames:
                    given += 1
                    yield frame

            with tqdm(total=info.frame_count, unit="frame", disable=args.quiet, file=sys.stderr,
                      desc=f"{width}x{height}") as bar:
                for out in engine.translate(state, counted()):
                    writer.write(getattr(out, "image", out))
                    bar.update()
        finally:
            engine.close()
        if writer.frames_written != given:
            raise ValueError(f"the engine returned {writer.frames_written} frames for {given} input frames")
    print(f"wrote {output} ({writer.frames_written} frames, {width}x{height}, {float(info.fps):.6g} fps)")
    return 0


# ---------------------------------------------------------------- metrics


def _add_metrics_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="the input video")
    p.add_argument("result", help="the translated video")
    p.add_argument("--clip", default=None, help="local CLIP model folder (default: $SV2V_CLIP)")
    p.add_argument("--flow", default="auto", choices=("auto", "dis", "raft"),
                   help="optical flow: RAFT when $SV2V_RAFT_WEIGHTS is set, else DIS (default auto)")


def run_metrics(args: argparse.Namespace) -> int:
    source_frames, _ = read_video(args.source)
    result_frames, _ = read_video(args.result)
    try:
        warp = compute_warp_error(source_frames, result_frames, flow=args.flow)
    except MetricUnavailable as err:
        raise UsageError(str(err)) from None
    note = f"; {warp.note}" if warp.note else ""
    print(f"warp error: {warp.value:.4f} (mean squared error, 0-255 pixels, {warp.pairs} frame pairs, "
          f"{warp.flow} flow{note})")
    try:
        frames, _ = read_video(args.result)
        clip = clip_consistency(frames, args.clip)
        print(f"CLIP frame consistency: {clip:.4f} (x100: {clip * 100:.2f})")
    except MetricUnavailable as err:
        print(f"CLIP frame consistency: not measured: {err}")
    return 0


# ---------------------------------------------------------------- main


def _register(sub, name: str, help: str, add_arguments, run) -> None:
    p = sub.add_parser(name, help=help, description=help)
    add_arguments(p)
    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m sv2v_core", description="StreamV2V Canvas: streaming video-to-video translation")
    sub = parser.add_subparsers(dest="command", metavar="{translate,metrics}", required=True)
    _register(sub, "translate", "translate a video file with a text prompt", _add_translate_arguments, run_translate)
    _register(sub, "metrics", "temporal consistency of a translated video", _add_metrics_arguments, run_metrics)
    return parser


def _error(err: BaseException) -> str:
    """One line: `error: ...` with the message's whitespace collapsed."""
    return "error: " + (" ".join(str(err).split()) or type(err).__name__)


class Terminated(Exception):
    """SIGTERM arrived: unwind like Ctrl+C, so the output being written is removed."""


def _terminate(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _terminable():
    """SIGTERM raises `Terminated` (instead of killing the process mid-write) while the command runs."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:  # someone else's process: leave it be
        yield
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    with quiet_library_warnings(), _terminable():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except UsageError as err:
        print(_error(err), file=sys.stderr)
        return 2
    except (VideoError, ModelLoadError, ValueError, OSError) as err:
        print(_error(err), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated; no output was written", file=sys.stderr)
        return 143
