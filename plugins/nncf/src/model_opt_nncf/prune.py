"""NNCF unstructured pruning (``nncf.prune``): magnitude (local or global) and regularization-based masks
trained through the test script's ``train`` hook; the masks are then burnt into the weights and NNCF's
hooks removed, so the result is the user's own architecture with zeros in it.

NNCF adds its ``HookStorage`` as a child module of the model it prunes; ``nn.Sequential.forward`` would
call that child too ("Module [HookStorage] is missing the required forward function"). Every model is
therefore pruned inside a thin holder module and taken out of it afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from model_opt.errors import TechniqueError
from model_opt.measure import call_model
from model_opt.result import TechniqueResult
from torch import nn

from .scope import ignored_scope

HOLDER = "inner"


class _Holder(nn.Module):
    """Holds the user's model while NNCF wraps it; in training, adds the regularization loss to whatever
    loss the caller computes from the output (see :class:`_AddLoss`)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.extra_loss: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        if self.training and self.extra_loss is not None and isinstance(out, torch.Tensor):
            out = _AddLoss.apply(out, self.extra_loss())
        return out


class _AddLoss(torch.autograd.Function):
    """Identity on ``output``; in backward, gives ``extra`` a gradient of one. The caller's loss, computed
    from the output, then trains the model as if ``extra`` had been added to it."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), device=grad.device, dtype=grad.dtype)


@contextlib.contextmanager
def mask_optimizer(holder: nn.Module, lr: float) -> Iterator[None]:
    """Step NNCF's mask logits with an Adam of their own after every backward pass: the user's optimizer,
    tuned for weights, would need thousands of steps to move them from their start (logit 0.99). Their
    gradients are cleared after the step, so the user's optimizer leaves them alone."""
    from nncf.torch.function_hook.pruning.rb.algo import get_pruned_modules

    masks = [module.mask for module in get_pruned_modules(holder).values()]
    optimizer = torch.optim.Adam(masks, lr=lr)
    seen: list[int] = []

    def after_accumulate(parameter: torch.Tensor) -> None:
        seen.append(1)
        if len(seen) == len(masks):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen.clear()

    handles = [mask.register_post_accumulate_grad_hook(after_accumulate) for mask in masks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _unwrap(holder: _Holder) -> nn.Module:
    """Burn the masks into the weights and remove NNCF's wrapping; return the user's model."""
    from nncf.torch.function_hook.strip import apply_compression_in_place
    from nncf.torch.function_hook.wrapper import ATR_HOOK_STORAGE

    apply_compression_in_place(holder)
    holder.__dict__.pop("forward", None)
    holder.__dict__.pop("_replicate_for_data_parallel", None)
    holder._modules.pop(ATR_HOOK_STORAGE, None)
    model = holder.inner
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def _sparsity(model: nn.Module) -> tuple[float, int]:
    zeros = total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(weight, torch.Tensor):
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return (zeros / total if total else 0.0), zeros


def _adapt_batch_norm(model: nn.Module, context: Any, batches: int) -> int:
    """NNCF's batch-norm adaptation on the calibration inputs: BN statistics re-estimated after pruning."""
    import nncf

    if context.calibration_data is None or not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                   for m in model.modules()):
        return 0
    items = list(islice(context.calibration_inputs(), batches))
    if items:
        nncf.batch_norm_adaptation(model, nncf.Dataset(items), num_iterations=len(items))
    return len(items)


def prune_unstructured(model: nn.Module, method: str, options: dict[str, Any], context: Any) -> TechniqueResult:
    import nncf

    example = context.require_example_input(f"nncf {method}")
    was_training = model.training
    holder = _Holder(model.eval())
    inputs = example if not isinstance(example, (tuple, list)) else tuple(example)
    info: dict[str, Any] = {}
    if method == "unstructured":
        mode = (nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_GLOBAL if options["scope"] == "global"
                else nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_LOCAL)
        holder = nncf.prune(holder, mode=mode, ratio=options["amount"], ignored_scope=ignored_scope(
            options["exclude"], f"{HOLDER}."), examples_inputs=inputs)
    else:
        if context.train is None:
            raise TechniqueError("nncf regularization trains its pruning masks, and the test script defines no "
                                 "train(model, dataset_path, steps)", "add train() to the test script, or use "
                                 "--prune-backend nncf --prune-type unstructured")
        from nncf.torch.function_hook.pruning.rb.losses import RBLoss

        holder = nncf.prune(holder, mode=nncf.PruneMode.UNSTRUCTURED_REGULARIZATION_BASED,
                            ignored_scope=ignored_scope(options["exclude"], f"{HOLDER}."), examples_inputs=inputs)
        rb_loss = RBLoss(holder, target_ratio=options["amount"], p=options["p"])
        object.__setattr__(holder, "extra_loss", rb_loss)  # not a submodule: RBLoss holds the model itself
        context.progress(f"nncf regularization: training the pruning masks for {options['train_steps']} steps")
        with mask_optimizer(holder, options["mask_lr"]):
            trained = context.train(holder, context.dataset_path, options["train_steps"])
        if isinstance(trained, nn.Module) and trained is not holder:
            raise TechniqueError("train() returned another model than it was given",
                                 "train the model in place and return it")
        holder.extra_loss = None
        info["mask_ratio_reached"] = round(rb_loss.current_ratio, 4)
    pruned = _unwrap(holder).eval()
    info["bn_adaptation_batches"] = _adapt_batch_norm(pruned, context, options["bn_batches"]) \
        if options["bn_adaptation"] else 0
    call_model(pruned, example)
    sparsity, zeros = _sparsity(pruned)
    if was_training:
        pruned.train()
    info.update({"sparsity": round(sparsity, 4), "zeroed_weights": zeros,
                 "note": "dense shapes are unchanged: expect no speed-up or size saving without a sparse runtime"})
    return TechniqueResult(pruned, info, {})
