"""Fold BatchNorm into the preceding Conv or Linear, and fuse Linear + GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) such that bn(x) == x * scale + shift in eval mode."""
    var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros(bn.num_features)
    scale = torch.rsqrt(var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


@torch.no_grad()
def fold_bn(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Return a copy of ``layer`` (Conv1d/2d/3d or Linear) with ``bn`` folded into weight and bias."""
    scale, shift = bn_scale_shift(bn)
    weight = layer.weight
    shape = [-1] + [1] * (weight.dim() - 1)  # out channels first, for Conv (any groups) and Linear
    new_weight = (weight.double() * scale.reshape(shape)).to(weight.dtype)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(shift)
    new_bias = (bias * scale + shift).to(weight.dtype)
    if isinstance(layer, nn.Linear):
        folded = nn.Linear(layer.in_features, layer.out_features, bias=True, device=weight.device,
                           dtype=weight.dtype)
    else:
        folded = type(layer)(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                             padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=True,
                             padding_mode=layer.padding_mode, device=weight.device, dtype=weight.dtype)
    folded.weight.copy_(new_weight)
    folded.bias.copy_(new_bias)
    return folded


def after_bn(bn: nn.Module) -> nn.Module:
    """What stays where the BatchNorm was: timm's BatchNormAct keeps its dropout and activation."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    parts = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


class LinearGELU(nn.Module):
    """Linear followed by GELU in one module.

    On CUDA, with a tanh-approximated GELU (or ``allow_tanh=True``), it runs as one cuBLASLt GEMM with
    a GELU epilogue (``torch._addmm_activation``). Elsewhere it computes exactly what the two modules
    did: on CPU ``_addmm_activation`` was measured no faster than linear + gelu, so it is not used.
    """

    def __init__(self, linear: nn.Linear, approximate: str = "none", allow_tanh: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.approximate = approximate
        self.allow_tanh = allow_tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cuda and self.bias is not None and (self.approximate == "tanh" or self.allow_tanh)
                and x.dtype == self.weight.dtype):
            flat = x.reshape(-1, x.shape[-1])
            out = torch._addmm_activation(self.bias, flat, self.weight.t(), use_gelu=True)
            return out.reshape(*x.shape[:-1], self.out_features)
        return F.gelu(F.linear(x, self.weight, self.bias), approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, approximate={self.approximate!r}"
