"""Which strength suits conditioning: how much of a drawing's strokes survive the render.

    python -m tools.controlnet_strength                 # built-in model + built-in ControlNet, 256²

For held-out synthetic drawings (dark pen strokes and a filled shape on
white or tinted paper), each rendered in latency mode (4 steps, first frame)
at strengths 0.4–0.8, without and with the ControlNet ("lines" control
image, scale 1.0), it prints:

- strokes kept: the render's stroke contrast (paper luminance minus stroke
  luminance, on the input's stroke and paper pixels) over the input's; 1
  keeps the strokes as drawn, 0 loses them;
- colour error: the mean absolute difference (0–255) between the filled
  shape's colour in the input and the render's mean colour over it: the
  painted colours a canvas user expects back;
- change: the mean absolute difference between render and input (0–255):
  how far the render departs from the drawing (what a higher strength buys).

A strength suits conditioning when its strokes kept, with the ControlNet, is
at least plain img2img's at 0.4 (the default: the composition holds as well
as it does today), while the painted colours are not lost.
With the built-in models this shows the mechanism only; check with real weights.
"""

from __future__ import annotations

import argparse
import random
import statistics

import numpy as np
import torch
from PIL import Image, ImageDraw

from sv2v_core import BankConfig, StreamConfig, StreamV2V, load_components
from sv2v_core.control import control_image

STRENGTHS = (0.4, 0.5, 0.6, 0.7, 0.8)
PAPERS = [(255, 255, 255), (245, 235, 215), (225, 235, 245)]
FILLS = [(220, 60, 50), (60, 120, 210), (70, 170, 80), (240, 200, 40)]


def drawing(rng: random.Random, size: int) -> np.ndarray:
    image = Image.new("RGB", (size, size), rng.choice(PAPERS))
    draw = ImageDraw.Draw(image)
    x0, y0 = rng.uniform(0.1, 0.5) * size, rng.uniform(0.1, 0.5) * size
    draw.ellipse([x0, y0, x0 + rng.uniform(0.2, 0.4) * size, y0 + rng.uniform(0.2, 0.4) * size],
                 fill=rng.choice(FILLS))
    for _ in range(rng.randint(3, 6)):
        points = [(rng.uniform(0.05, 0.95) * size, rng.uniform(0.05, 0.95) * size) for _ in range(rng.randint(2, 4))]
        draw.line(points, fill=(rng.randint(0, 40),) * 3, width=rng.randint(2, max(3, size // 40)), joint="curve")
    return np.asarray(image)


def strokes_kept(frame: np.ndarray, render: np.ndarray) -> float:
    ink = control_image(frame, "lines")[:, :, 0]
    dark = frame.mean(axis=2) < 60                       # the pen strokes (not the filled shape)
    stroke, paper = (ink > 200) & dark, ink == 0
    luminance = lambda image: image.astype(np.float64).mean(axis=2)  # noqa: E731
    contrast = lambda image: luminance(image)[paper].mean() - luminance(image)[stroke].mean()  # noqa: E731
    return contrast(render) / contrast(frame)


def colour_error(frame: np.ndarray, render: np.ndarray) -> float:
    fill = np.isin(frame.reshape(-1, 3) @ [65536, 256, 1], [r * 65536 + g * 256 + b for r, g, b in FILLS])
    fill = fill.reshape(frame.shape[:2])
    return float(np.abs(render[fill].mean(axis=0) - frame[fill].mean(axis=0)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--controlnet", default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--drawings", type=int, default=12)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)

    engine = StreamV2V(load_components(args.model, controlnet=args.controlnet))
    rng = random.Random(args.seed)
    frames = [drawing(rng, args.size) for _ in range(args.drawings)]
    print(f"{args.model} + ControlNet {args.controlnet}, {args.size}², latency mode, 4 steps, "
          f"{args.drawings} drawings (median over drawings)")
    print("| strength | strokes kept, plain | strokes kept, ControlNet | colour error, plain | colour error, ControlNet "
          "| change, plain | change, ControlNet |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for strength in STRENGTHS:
        cells = {}
        for scale in (0.0, 1.0):
            config = StreamConfig(prompt="an ink drawing", width=args.size, height=args.size, mode="latency",
                                  strength=strength, control_scale=scale, control_image="lines",
                                  bank=BankConfig(mode="dyme"), similarity_skip=None, scene_cut=None)
            kept, colour, change = [], [], []
            for frame in frames:
                render = engine(engine.new_stream(config), frame).image
                kept.append(strokes_kept(frame, render))
                colour.append(colour_error(frame, render))
                change.append(float(np.abs(render.astype(int) - frame.astype(int)).mean()))
            cells[scale] = statistics.median(kept), statistics.median(colour), statistics.median(change)
        plain, conditioned = cells[0.0], cells[1.0]
        print(f"| {strength:.1f} | {plain[0]:.2f} | {conditioned[0]:.2f} | {plain[1]:.1f} | {conditioned[1]:.1f} | "
              f"{plain[2]:.1f} | {conditioned[2]:.1f} |", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
