"""Bipartite soft matching and size-weighted merging, written from the ToMe paper.

Bolya et al., "Token Merging: Your ViT but Faster" (ICLR 2023), section 3: tokens are split
alternately into two sets A and B; each token of A is linked to its most similar token of B (cosine
similarity of the attention keys); the ``r`` most similar links are merged by averaging, weighted by
how many patches each token already stands for; protected tokens (class, distillation, registers)
never merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Merge:
    """The indices of one merge step, applied with :func:`merge_weighted`."""

    keep_a: torch.Tensor  # [B, Na - r, 1] indices into A of the tokens that stay
    src_a: torch.Tensor  # [B, r, 1] indices into A of the tokens merged away
    dst_b: torch.Tensor  # [B, r, 1] index into B each of them merges into


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int) -> Merge | None:
    """Plan the merge of ``r`` tokens of ``metric`` [B, N, C]; the first ``protected`` tokens never merge."""
    n = metric.shape[1]
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb]
        for token in range(protected):
            if token % 2 == 0:
                scores[:, token // 2, :] = -torch.inf  # a protected token of A is never merged away
            else:
                scores[:, :, token // 2] = -torch.inf  # nothing merges into a protected token of B
        best, best_b = scores.max(dim=-1)  # [B, Na]
        order = best.argsort(dim=-1, descending=True)[..., None]  # most similar first
        src_a, keep_a = order[:, :r], order[:, r:]
        keep_a = keep_a.sort(dim=1).values  # keep the original order (the class token stays first)
        dst_b = best_b[..., None].gather(dim=1, index=src_a)
    return Merge(keep_a, src_a, dst_b)


def merge_weighted(merge: Merge, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` [B, N, C] with token sizes ``size`` [B, N, 1]: size-weighted means, sizes summed."""
    weighted = torch.cat([x * size, size], dim=-1)
    a, b = weighted[:, ::2], weighted[:, 1::2]
    channels = weighted.shape[-1]
    kept = a.gather(dim=1, index=merge.keep_a.expand(-1, -1, channels))
    src = a.gather(dim=1, index=merge.src_a.expand(-1, -1, channels))
    b = b.scatter_reduce(1, merge.dst_b.expand(-1, -1, channels), src, reduce="sum")
    merged = torch.cat([kept, b], dim=1)
    new_size = merged[..., -1:]
    return merged[..., :-1] / new_size, new_size
