"""Patch timm VisionTransformer / DeiT models with token merging, and remove the patch.

Each timm ``Block`` becomes a :class:`ToMeBlock` and its ``Attention`` a :class:`ToMeAttention`
(subclasses, so a saved model unpickles wherever this plugin is installed). The attention adds
log(token size) to its logits (proportional attention) through the fused scaled-dot-product path
and returns the mean key over heads as the similarity metric; the block merges ``r`` tokens between
attention and MLP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .merge import bipartite_soft_matching, merge_weighted


class ToMeAttention(Attention):
    """timm Attention with proportional attention; returns (output, mean key over heads)."""

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = size.log()[:, None, None, :, 0].to(q.dtype) if size is not None else None  # [B, 1, 1, N]
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x)), k.mean(dim=1)


class ToMeBlock(Block):
    """timm Block that merges ``tome_r`` tokens after attention; sizes flow through ``tome_state``."""

    tome_r: int = 0
    tome_first: bool = False
    tome_protected: int = 1
    tome_prop_attn: bool = True
    tome_state: dict[str, Any]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if attn_mask is not None or kwargs.get("is_causal"):
            raise RuntimeError("token merging does not support attention masks")
        if self.tome_first:
            self.tome_state["size"] = None
        size = self.tome_state["size"]
        out, metric = self.attn(self.norm1(x), size if self.tome_prop_attn else None)
        x = x + self.drop_path1(self.ls1(out))
        merge = bipartite_soft_matching(metric, self.tome_r, self.tome_protected)
        if merge is not None:
            if size is None:
                size = torch.ones_like(x[..., :1])
            x, size = merge_weighted(merge, x, size)
            self.tome_state["size"] = size
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def check_patchable(model: nn.Module) -> list[Block]:
    """The model's blocks, or a ValueError saying why token merging cannot patch it."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer (or DeiT)")
    blocks = list(model.blocks)
    for index, block in enumerate(blocks):
        if type(block) not in (Block, ToMeBlock):
            raise ValueError(f"block {index} is a {type(block).__name__}; token merging patches timm's Block only")
        if type(block.attn) not in (Attention, ToMeAttention):
            raise ValueError(f"block {index} uses {type(block.attn).__name__}; token merging patches timm's "
                             "Attention only (no rotary or pooled attention)")
    if model.global_pool not in ("token", "avg", "", None):
        raise ValueError(f"global_pool={model.global_pool!r} is not supported; use 'token' or 'avg'")
    return blocks


def token_count(model: VisionTransformer) -> int:
    """Tokens entering the first block at the model's configured image size."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


def simulate(tokens: int, rs: list[int], protected: int) -> list[int]:
    """Tokens entering each block, and leaving the last, with the per-block cap of bipartite matching."""
    counts = [tokens]
    for r in rs:
        tokens -= max(0, min(r, (tokens - protected) // 2))
        counts.append(tokens)
    return counts


def schedule(r: int | list[int], layers: int) -> list[int]:
    values = list(r) if isinstance(r, (list, tuple)) else [int(r)] * layers
    if len(values) != layers:
        raise ValueError(f"an r schedule needs one value per block ({layers}), got {len(values)}")
    return [int(v) for v in values]


def apply_patch(model: nn.Module, r: int | list[int], prop_attn: bool = True) -> dict[str, Any]:
    """Patch ``model`` in place; ``r`` tokens merged per block (an int, or one value per block)."""
    blocks = check_patchable(model)
    remove_patch(model)
    rs = schedule(r, len(blocks))
    state: dict[str, Any] = {"size": None}
    for index, (block, r_layer) in enumerate(zip(blocks, rs, strict=True)):
        block.__class__ = ToMeBlock
        block.attn.__class__ = ToMeAttention
        block.tome_r, block.tome_first = r_layer, index == 0
        block.tome_protected, block.tome_state = model.num_prefix_tokens, state
        block.tome_prop_attn = prop_attn
    model.tome_r = rs
    return {"r": rs, "tokens_per_block": simulate(token_count(model), rs, model.num_prefix_tokens),
            "protected_tokens": model.num_prefix_tokens}


def remove_patch(model: nn.Module) -> nn.Module:
    for block in getattr(model, "blocks", []):
        if isinstance(block, ToMeBlock):
            block.__class__ = Block
            block.attn.__class__ = Attention
            for name in ("tome_r", "tome_first", "tome_protected", "tome_state", "tome_prop_attn"):
                block.__dict__.pop(name, None)
    model.__dict__.pop("tome_r", None)
    return model
