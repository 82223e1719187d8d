"""Temporal-consistency metrics of a translated video (paper §5.3.1).

Warp error: optical flow is computed between consecutive SOURCE frames t and
t+1 (forward and backward).  Result frame t+1 is warped back onto frame t
along the forward flow (cv2.remap), and the mean squared difference to result
frame t is taken over the pixels that are not occluded, then averaged over
all frame pairs.  A pixel counts as occluded when the forward and backward
flows disagree (Sundaram et al., 2010):

    |f(x) + b(x + f(x))|^2  >=  0.01 (|f(x)|^2 + |b(x + f(x))|^2) + 0.5

or when x + f(x) leaves the frame.  The error is on the 0-255 pixel scale,
averaged over the three RGB channels.  The paper's absolute numbers (73-117)
come from its own pipeline (RAFT flow, its data and scaling); compare
variants with each other, not with the paper.

Flow: OpenCV DIS (preset MEDIUM, grayscale) always works offline.
torchvision's RAFT (the paper's estimator) is used only when a weights file
is present locally: set SV2V_RAFT_WEIGHTS to a raft_large or raft_small
state dict (.pth/.pt, loaded with weights_only=True) and have torchvision
installed.  Nothing is downloaded.

CLIP frame consistency: mean cosine similarity of the CLIP image embeddings
of consecutive result frames (the paper reports it x100).  Needs a local CLIP
model folder (transformers format), given as `clip_path` or SV2V_CLIP;
without one `MetricUnavailable` says so plainly.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file

RAFT_ENV = "SV2V_RAFT_WEIGHTS"
CLIP_ENV = "SV2V_CLIP"
CLIP_MISSING = f"CLIP weights not found; set {CLIP_ENV}=... to a local CLIP model folder"

Flow = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (rgb_a, rgb_b) -> HxWx2 flow a->b


class MetricUnavailable(RuntimeError):
    """A metric that needs weights which are not present locally."""


@dataclass(frozen=True)
class WarpErrorResult:
    value: float   # mean squared error, 0-255 pixel scale
    flow: str      # "DIS" or "RAFT"
    pairs: int     # frame pairs that had non-occluded pixels
    note: str      # e.g. "RAFT weights not found, used DIS"


# ---------------------------------------------------------------- flow


def dis_flow() -> Flow:
    """OpenCV DIS optical flow (preset MEDIUM) on grayscale frames."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

    def flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        gray_a = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
        gray_b = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
        return dis.calc(gray_a, gray_b, None)

    return flow


def raft_flow(weights: str | os.PathLike) -> Flow:
    """torchvision RAFT (large or small) from a local state dict; no download."""
    import torch
    import torch.nn.functional as F
    from torchvision.models.optical_flow import raft_large, raft_small

    try:
        if str(weights).endswith(".safetensors"):
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"cannot read the RAFT weights {weights} ({type(err).__name__})") from None
    for build in (raft_large, raft_small):
        model = build(weights=None)
        if isinstance(state, dict) and set(model.state_dict()) == set(state):
            model.load_state_dict(state)
            break
    else:
        raise ValueError(f"{RAFT_ENV}={weights} is not a raft_large or raft_small state dict")
    model.eval()

    def to_tensor(image: np.ndarray) -> torch.Tensor:
        # RAFT needs sides that are multiples of 8 and at least 128: pad by repetition
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        h, w = image.shape[:2]
        return F.pad(x, (0, max(128, w + -w % 8) - w, 0, max(128, h + -h % 8) - h), mode="replicate")

    @torch.inference_mode()
    def flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        h, w = a.shape[:2]
        out = model(to_tensor(a), to_tensor(b))[-1][0, :, :h, :w]
        return out.permute(1, 2, 0).numpy().astype(np.float32)

    return flow


def choose_flow(method: str = "auto") -> tuple[Flow, str, str]:
    """(flow function, its name, a note on the choice).  method: auto|dis|raft."""
    if method not in ("auto", "dis", "raft"):
        raise ValueError(f"flow must be auto, dis or raft, got {method!r}")
    if method == "dis":
        return dis_flow(), "DIS", ""
    weights = os.environ.get(RAFT_ENV, "")
    if not weights or not Path(weights).is_file():
        problem = "RAFT weights not found" + ("" if weights else f" (set {RAFT_ENV} to a local file)")
    elif importlib.util.find_spec("torchvision") is None:
        problem = "RAFT needs torchvision, which is not installed"
    else:
        return raft_flow(weights), "RAFT", ""
    if method == "raft":
        raise MetricUnavailable(problem)
    return dis_flow(), "DIS", problem.replace(" (", ", used DIS (", 1) if "(" in problem else problem + ", used DIS"


# ---------------------------------------------------------------- warp error


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))


def _remap(image: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def valid_mask(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Pixels of frame t whose forward flow passes the consistency check."""
    height, width = forward.shape[:2]
    xs, ys = _grid(height, width)
    map_x, map_y = xs + forward[..., 0], ys + forward[..., 1]
    back = _remap(backward, map_x, map_y)
    mismatch = np.sum((forward + back) ** 2, axis=-1)
    magnitude = np.sum(forward**2, axis=-1) + np.sum(back**2, axis=-1)
    inside = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    return inside & (mismatch < 0.01 * magnitude + 0.5)


def pair_warp_error(result_t: np.ndarray, result_next: np.ndarray, forward: np.ndarray, mask: np.ndarray) -> float | None:
    """MSE between result t and result t+1 warped back along `forward`."""
    if not mask.any():
        return None
    height, width = forward.shape[:2]
    xs, ys = _grid(height, width)
    warped = _remap(result_next.astype(np.float32), xs + forward[..., 0], ys + forward[..., 1])
    diff = (warped - result_t.astype(np.float32))[mask]
    return float(np.mean(diff**2))


def _fit(frame: np.ndarray, like: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame, dtype=np.uint8)
    if frame.shape[:2] != like.shape[:2]:
        frame = cv2.resize(frame, (like.shape[1], like.shape[0]), interpolation=cv2.INTER_AREA)
    return frame


def compute_warp_error(
    source_frames: Iterable[np.ndarray], result_frames: Iterable[np.ndarray], flow: str = "auto"
) -> WarpErrorResult:
    """Warp error of `result_frames` given the motion of `source_frames`.

    Both are RGB uint8 frames, the same number of each; result frames are
    resized to the source size when they differ.  Frames are consumed as
    a stream, two at a time.
    """
    estimate, name, note = choose_flow(flow)
    errors: list[float] = []
    previous = None
    count = 0
    sources, results = iter(source_frames), iter(result_frames)
    for source in sources:
        result = next(results, None)
        if result is None:
            raise ValueError(f"the result has fewer frames than the source ({count})")
        source = np.asarray(source, dtype=np.uint8)
        result = _fit(result, source)
        count += 1
        if previous is not None:
            source_t, result_t = previous
            forward = estimate(source_t, source)
            backward = estimate(source, source_t)
            error = pair_warp_error(result_t, result, forward, valid_mask(forward, backward))
            if error is not None:
                errors.append(error)
        previous = (source, result)
    if next(results, None) is not None:
        raise ValueError(f"the result has more frames than the source ({count})")
    if count < 2:
        raise ValueError("warp error needs at least two frames")
    value = float(np.mean(errors)) if errors else float("nan")
    return WarpErrorResult(value, name, len(errors), note)


def warp_error(source_frames: Iterable[np.ndarray], result_frames: Iterable[np.ndarray], flow: str = "auto") -> float:
    """Mean squared warp error (0-255 scale); see `compute_warp_error`."""
    return compute_warp_error(source_frames, result_frames, flow).value


# ---------------------------------------------------------------- CLIP


def clip_consistency(frames: Iterable[np.ndarray], clip_path: str | os.PathLike | None = None, batch_size: int = 16) -> float:
    """Mean cosine similarity of CLIP image embeddings of consecutive frames.

    clip_path: a local transformers CLIP model folder (default: $SV2V_CLIP).
    Raises MetricUnavailable when no such folder is present.
    """
    folder = clip_path or os.environ.get(CLIP_ENV)
    if not folder or not Path(folder).is_dir():
        raise MetricUnavailable(CLIP_MISSING)
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)

    embeddings = []
    batch: list[np.ndarray] = []

    def embed() -> None:
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            features = model.get_image_features(pixel_values=pixels)
        if not isinstance(features, torch.Tensor):  # some versions return a model output
            features = features.pooler_output
        embeddings.append(torch.nn.functional.normalize(features.float(), dim=-1))
        batch.clear()

    for frame in frames:
        batch.append(np.asarray(frame, dtype=np.uint8))
        if len(batch) == batch_size:
            embed()
    if batch:
        embed()
    if not embeddings:
        raise ValueError("CLIP consistency needs at least two frames")
    emb = torch.cat(embeddings)
    if len(emb) < 2:
        raise ValueError("CLIP consistency needs at least two frames")
    return float((emb[1:] * emb[:-1]).sum(-1).mean())
