"""Dynamic merging (DyMe, paper §4.3): bipartite soft matching across frames.

Like token merging for Stable Diffusion, matching is separated from merging:
`random_bipartite_match` looks at one metric (the keys) and returns a `Match`
whose `merge` applies the same assignment to any tensor laid out token by token
in the same order (keys, values, block outputs).

Given 2N tokens (the bank's N and the new frame's N), the tokens are split at
random into two halves src and dst of N each; every src token is sent to its
most cosine-similar dst token, and every dst token becomes the mean of itself
and the src tokens it received.  The result has exactly N tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# Similarities computed at once, at most: on a GPU a bound on memory (256 MB in float32: batched
# merges of many streams' 4096-token layers would take gigabytes), on a CPU on cache misses (a
# 4 MB block: measured 2x faster than one 50 MB block for twelve 1024-token rows).
SIMILARITY_BLOCK = {"cuda": 2**26, "cpu": 2**20}


def best_match(a: torch.Tensor, b: torch.Tensor, chunk: int | None = None,
               keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token of `a` (B, N, C): the cosine similarity and index of its
    most similar token of `b` (B, M, C).  Rows are taken `chunk` at a time so
    the B×chunk×M similarity block, not B×N×M, bounds the memory (default:
    as many as fit `SIMILARITY_BLOCK` of the device).  `keep` (B, M) bool:
    only these tokens of `b` may be chosen (a row with none gets similarity
    −inf).

    Computed in float32 whatever the model's dtype: in bfloat16 neighbouring
    similarities near 1 are 0.004 apart (coarser than the fusion threshold's
    margin), and float16 normalises a zero vector to NaN.  At these token
    counts the cost is small."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1).transpose(1, 2)
    if chunk is None:
        block = SIMILARITY_BLOCK.get(a.device.type, SIMILARITY_BLOCK["cuda"])
        chunk = max(1, block // max(1, a.shape[0] * b.shape[2]))  # b is (B, C, M) here
    absent = None if keep is None else torch.where(keep, 0.0, float("-inf")).unsqueeze(1)  # (B, 1, M)
    scores, indices = [], []
    for start in range(0, a.shape[1], chunk):
        similarity = torch.bmm(a[:, start:start + chunk], b)
        if absent is not None:
            similarity = similarity + absent
        best = similarity.max(dim=-1)
        scores.append(best.values)
        indices.append(best.indices)
    return torch.cat(scores, dim=1), torch.cat(indices, dim=1)


@dataclass(frozen=True)
class Match:
    """One bipartite assignment of 2N tokens into N, for every batch row.

    src_index, dst_index: (B, N) positions of the two halves among the 2N.
    assignment: (B, N) for each src token, the dst token (0..N−1) it joins.
    """

    src_index: torch.Tensor
    dst_index: torch.Tensor
    assignment: torch.Tensor

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the assignment to `x` (B, 2N, C): each dst token becomes the
        mean of itself and the src tokens sent to it.  Returns (B, N, C)."""
        src = _gather_tokens(x, self.src_index).float()
        dst = _gather_tokens(x, self.dst_index).float()
        index = self.assignment.unsqueeze(-1)
        dst.scatter_add_(1, index.expand(-1, -1, x.shape[-1]), src)
        counts = torch.ones_like(dst[..., :1]).scatter_add_(1, index, torch.ones_like(src[..., :1]))
        return (dst / counts).to(x.dtype)


def bipartite_match(metric: torch.Tensor, order: torch.Tensor) -> Match:
    """Split the 2N tokens of `metric` (B, 2N, C) by `order` (B, 2N), a
    permutation of the tokens per row: its first half is src, its second
    dst.  Match each src token to its most cosine-similar dst token."""
    batch, tokens, _ = metric.shape
    if tokens % 2:
        raise ValueError(f"bipartite matching needs an even number of tokens, got {tokens}")
    half = tokens // 2
    src_index, dst_index = order[:, :half], order[:, half:]
    _, assignment = best_match(_gather_tokens(metric, src_index), _gather_tokens(metric, dst_index))
    return Match(src_index, dst_index, assignment)


def random_order(uniform: torch.Tensor) -> torch.Tensor:
    """A random permutation per row from uniform draws (B, 2N): their argsort."""
    return uniform.argsort(dim=-1)


def random_bipartite_match(metric: torch.Tensor, generator: torch.Generator | None = None) -> Match:
    """Split the 2N tokens of `metric` (B, 2N, C) at random and match each
    src token to its most cosine-similar dst token.

    The split is drawn independently for each batch row from `generator`, on
    `metric`'s device (the generator must live there too), so no index
    tensor crosses from the host.
    """
    batch, tokens, _ = metric.shape
    uniform = torch.rand(batch, tokens, generator=generator, device=metric.device)
    return bipartite_match(metric, random_order(uniform))
