"""Feature fusion (FF, paper eq. 2).

Each token p of the current output O_t moves toward its most cosine-similar
banked token q: O'_t(p) = (1 − α)·O_t(p) + α·O_fb(q), but only where that best
similarity exceeds `threshold` — new content with no good match in the past is
left as it is.

A banked token may be marked as absent (`keep`: a bank buffer not yet full):
it never wins the argmax, and a row whose tokens are all absent is left
exactly as it is, as if there were no bank.  α and the threshold may differ
per batch row (tensors), so streams with other settings share one call.
"""

from __future__ import annotations

import torch

from .merging import best_match


def fuse(current: torch.Tensor, banked: torch.Tensor, alpha: float | torch.Tensor,
         threshold: float | torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Fuse `current` (B, N, C) with `banked` (B, M, C); returns (B, N, C).

    alpha: a number, or (B, 1, 1) per row; threshold: a number, or (B, 1).
    keep: (B, M) bool, the banked tokens that exist (None: all)."""
    if not isinstance(alpha, torch.Tensor) and alpha == 0:
        return current
    score, index = best_match(current, banked, keep=keep)
    nearest = banked.gather(1, index.unsqueeze(-1).expand(-1, -1, banked.shape[-1]))
    alpha = alpha.to(current.dtype) if isinstance(alpha, torch.Tensor) else alpha
    fused = torch.lerp(current, nearest.to(current.dtype), alpha)
    return torch.where((score > threshold).unsqueeze(-1), fused, current)
