"""Feature fusion (FF, paper eq. 2).

Each token p of the current output O_t moves toward its most cosine-similar
banked token q: O'_t(p) = (1 − α)·O_t(p) + α·O_fb(q), but only where that best
similarity exceeds `threshold` — new content with no good match in the past is
left as it is.
"""

from __future__ import annotations

import torch

from .merging import best_match


def fuse(current: torch.Tensor, banked: torch.Tensor, alpha: float, threshold: float) -> torch.Tensor:
    """Fuse `current` (B, N, C) with `banked` (B, M, C); returns (B, N, C)."""
    if alpha == 0.0:
        return current
    score, index = best_match(current, banked)
    nearest = banked.gather(1, index.unsqueeze(-1).expand(-1, -1, banked.shape[-1]))
    fused = torch.lerp(current, nearest.to(current.dtype), alpha)
    return torch.where((score > threshold).unsqueeze(-1), fused, current)
