"""A token-merged UNet that can be saved: tomesd patches with classes made on the fly, which pickle
cannot save, so the wrapper pickles the unpatched UNet with the patch settings and patches again when
loaded."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


def _rebuild(unet: nn.Module, options: dict[str, Any]) -> TokenMergedUNet:
    import tomesd

    tomesd.apply_patch(unet, **options)
    return TokenMergedUNet(unet, options)


class TokenMergedUNet(nn.Module):
    """Calls the patched UNet; other attributes (config, dtype, ...) are the UNet's."""

    def __init__(self, unet: nn.Module, options: dict[str, Any]) -> None:
        super().__init__()
        self.unet = unet
        self.tome_options = dict(options)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.unet(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)

    def __reduce_ex__(self, protocol: Any) -> Any:
        import tomesd

        clone = copy.deepcopy(self.unet)
        tomesd.remove_patch(clone)
        return (_rebuild, (clone, self.tome_options))
