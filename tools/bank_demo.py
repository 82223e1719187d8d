"""What the feature bank does to flicker, shown on the built-in model.

Renders a synthetic "drawing" video (a sketch that pans and grows a stroke)
with no bank, a queue of one frame and DyMe, prints the warp error of each
(lower = more temporally consistent; `sv2v_core.metrics`), and saves a strip
of frames: input on top, then one row per bank.

    python -m tools.bank_demo [--frames 24] [--size 128] [--out docs/bank_demo.png]
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

from sv2v_core import BankConfig, StreamConfig, StreamV2V, load_components
from sv2v_core.metrics import warp_error

BANKS = {"no bank": BankConfig(mode="none"), "queue(1)": BankConfig(mode="queue"), "DyMe(1)": BankConfig(mode="dyme")}


def drawing(index: int, size: int) -> np.ndarray:
    """Frame `index` of a sketch that pans right and gains a stroke."""
    image = Image.new("RGB", (size, size), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    shift = index * size // 64
    draw.rectangle((0, int(size * 0.7), size, size), fill=(90, 160, 70))
    draw.ellipse((size * 0.7 - shift, size * 0.1, size * 0.9 - shift, size * 0.3), fill=(250, 210, 60))
    draw.rectangle((size * 0.3 + shift, size * 0.45, size * 0.6 + shift, size * 0.75), fill=(200, 90, 60))
    draw.polygon([(size * 0.25 + shift, size * 0.45), (size * 0.45 + shift, size * 0.28),
                  (size * 0.65 + shift, size * 0.45)], fill=(120, 60, 40))
    draw.line([(size * 0.05, size * 0.9), (size * 0.05 + index * size / 40, size * 0.85)], fill=(20, 20, 20), width=3)
    return np.asarray(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default="docs/bank_demo.png")
    args = parser.parse_args()

    engine = StreamV2V(load_components("tiny"))
    frames = [drawing(index, args.size) for index in range(args.frames)]
    rows = [frames]
    for name, bank in BANKS.items():
        state = engine.new_stream(StreamConfig(prompt="a watercolor painting", width=args.size, height=args.size,
                                               bank=bank, similarity_skip=None))
        rendered = list(engine.translate(state, frames))
        print(f"{name:9s} warp error {warp_error(frames, rendered):8.2f}")
        rows.append(rendered)
    shown = np.linspace(0, args.frames - 1, 6).round().astype(int)
    strip = np.concatenate([np.concatenate([row[i] for i in shown], axis=1) for row in rows], axis=0)
    Image.fromarray(strip).save(args.out)
    print(f"wrote {args.out} (rows: input, {', '.join(BANKS)}; frames {', '.join(map(str, shown))})")


if __name__ == "__main__":
    main()
