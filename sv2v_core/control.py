"""Control images: what a ControlNet sees of each frame.

Scribble and line-art ControlNets (SD1.5 family) were trained on white lines
on a black background; a canny ControlNet on thin white edges on black.  The
engine derives one control image per input frame, at the frame's render
size, with the stream's `StreamConfig.control_image` kind:

- "lines" (for a canvas): the strokes, whatever their colour, as white lines
  on black.  The paper is the canvas's most common colour (a drawing is
  mostly paper; any flat background fill works, dark ones too); each
  pixel's ink is how far its colour is from the paper (the largest channel
  difference), full from a quarter of the range up (`LINE_CONTRAST`), so an
  anti-aliased stroke edge gives a grey, a black or coloured stroke a white
  line.  A photo or a busy background has no paper colour: use "canny".
- "canny" (for video): OpenCV's Canny edges with thresholds 100 and 200
  (those of the ControlNet authors' canny annotator), thin white edges on
  black.  Line-art and scribble ControlNets accept them too.
- "image": the frame itself, for a control map made elsewhere (e.g. a video
  that already is an edge or depth map).

`control_image(frame, kind)` returns a uint8 H×W×3 array; the engine hands it
to the ControlNet as floats in [0, 1], as diffusers' ControlNet pipelines do.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .config import CONTROL_IMAGES

# The img2img strength to use with conditioning (the CLI's and the app's default with a ControlNet): plain
# img2img at 0.4 keeps a rough sketch rough; with the ControlNet holding the lines, more noise can go in
# (more restyling) before the composition is lost.  Measured in README.md ("Scribble and line-art conditioning").
CONTROLLED_STRENGTH = 0.6
LINE_CONTRAST = 0.25        # a colour this far from the paper (fraction of the range) is full ink
CANNY_THRESHOLDS = (100, 200)
PAPER_SAMPLES = 4096        # pixels sampled to find the paper colour
PAPER_LEVELS = 32           # colours are binned this coarsely per channel (JPEG noise, paper texture)


def control_image(frame: np.ndarray, kind: str) -> np.ndarray:
    """The control image (uint8 H×W×3, white on black) of an RGB uint8 frame."""
    if kind == "lines":
        return _grey_to_rgb(lines(frame))
    if kind == "canny":
        return _grey_to_rgb(cv2.Canny(np.ascontiguousarray(frame), *CANNY_THRESHOLDS))
    if kind == "image":
        return frame
    raise ValueError(f"control image must be one of {', '.join(CONTROL_IMAGES)}, got {kind!r}")


def lines(frame: np.ndarray) -> np.ndarray:
    """The strokes of a drawing as white lines on black (uint8 H×W)."""
    paper = paper_colour(frame)
    channels = cv2.split(np.ascontiguousarray(frame))
    ink = cv2.absdiff(channels[0], int(paper[0]))
    for channel, level in zip(channels[1:], paper[1:]):
        ink = cv2.max(ink, cv2.absdiff(channel, int(level)))
    return cv2.convertScaleAbs(ink, alpha=1.0 / LINE_CONTRAST)  # rounds and saturates at 255


def paper_colour(frame: np.ndarray) -> np.ndarray:
    """The most common colour of `frame` (RGB uint8): the mean of the pixels in
    the fullest coarse colour bin of an evenly spaced sample."""
    height, width = frame.shape[:2]
    stride = max(1, int(math.sqrt(height * width / PAPER_SAMPLES)))
    sample = frame[::stride, ::stride].reshape(-1, 3)
    shift = 8 - int(math.log2(PAPER_LEVELS))
    bins = sample >> shift
    packed = (bins[:, 0].astype(np.int32) * PAPER_LEVELS + bins[:, 1]) * PAPER_LEVELS + bins[:, 2]
    fullest = np.bincount(packed, minlength=PAPER_LEVELS**3).argmax()
    return sample[packed == fullest].mean(axis=0).round().astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)
