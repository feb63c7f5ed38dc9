"""Low-rank factorization of Linear and Conv2d layers by truncated SVD."""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``Linear(in, out)`` as ``Linear(in, r, bias=False)`` then ``Linear(r, out)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class LowRankConv2d(nn.Module):
    """``Conv2d(in, out, k)`` as a ``k x k`` conv with ``r`` outputs, then a ``1 x 1`` conv to ``out``."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.rank = conv.in_channels, conv.out_channels, rank
        self.first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                               dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode)
        self.second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def choose_rank(singular: torch.Tensor, rank_ratio: float | None, energy: float | None) -> int:
    """Rank from a ratio of min(in, out), or the smallest rank keeping ``energy`` of sum(s^2)."""
    full = singular.numel()
    if energy is not None:
        kept = torch.cumsum(singular.double() ** 2, 0) / (singular.double() ** 2).sum()
        return min(full, int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1)
    return max(1, min(full, int(round(rank_ratio * full))))


def factor_params(out_f: int, in_f: int, rank: int) -> int:
    """Weights of the factorized pair (biases excluded): r * (in + out)."""
    return rank * (in_f + out_f)


@torch.no_grad()
def factorize(weight2d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A ~= weight2d, A: [r, in], B: [out, r]; singular values split evenly."""
    u, s, vh = torch.linalg.svd(weight2d.double(), full_matrices=False)
    root = s[:rank].sqrt()
    first = (root[:, None] * vh[:rank]).to(weight2d.dtype)
    second = (u[:, :rank] * root[None, :]).to(weight2d.dtype)
    return first, second


@torch.no_grad()
def low_rank_linear(layer: nn.Linear, rank: int) -> LowRankLinear:
    new = LowRankLinear(layer.in_features, layer.out_features, rank, bias=layer.bias is not None)
    first, second = factorize(layer.weight, rank)
    new.first.weight.copy_(first)
    new.second.weight.copy_(second)
    if layer.bias is not None:
        new.second.bias.copy_(layer.bias)
    return new.to(layer.weight.device)


@torch.no_grad()
def low_rank_conv(conv: nn.Conv2d, rank: int) -> LowRankConv2d:
    new = LowRankConv2d(conv, rank)
    weight = conv.weight.reshape(conv.out_channels, -1)
    first, second = factorize(weight, rank)
    new.first.weight.copy_(first.reshape(rank, conv.in_channels, *conv.kernel_size))
    new.second.weight.copy_(second.reshape(conv.out_channels, rank, 1, 1))
    if conv.bias is not None:
        new.second.bias.copy_(conv.bias)
    return new.to(conv.weight.device)


def singular_values(weight2d: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(weight2d.double())
