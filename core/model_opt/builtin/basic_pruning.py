"""The core's own plugin: unstructured magnitude pruning with torch.nn.utils.prune.

It zeroes individual weights (masks made permanent, no pruning hooks left behind). The dense shapes
stay the same, so it saves nothing in latency or dense size: it says so in the report and points to
structured pruning.
"""

from __future__ import annotations

from typing import Any

from model_opt.hookspecs import hookimpl
from model_opt.registry import Option, Technique

UNSTRUCTURED = Technique(
    kind="prune",
    backend="basic",
    method="unstructured",
    summary="Zero the smallest weights of every Linear and Conv layer (torch.nn.utils.prune).",
    options=(
        Option("amount", float, 0.5, flag="--prune-amount", help="fraction of weights to zero", minimum=0.0,
               maximum=1.0, exclusive_minimum=True, exclusive_maximum=True),
        Option("criterion", str, "l1", flag="--prune-criterion",
               help="which weights go: smallest |w| (l1, magnitude) or random",
               choices=("l1", "magnitude", "random")),
        Option("scope", str, "layer", "rank weights per layer, or across all layers at once",
               choices=("layer", "global")),
        Option("exclude", list, [], "module names (or name prefixes) to leave untouched"),
    ),
    speeds_up=(),
    default=True,
    search_space={"amount": (0.3, 0.5, 0.7)},
    speed_note="unstructured sparsity keeps dense shapes, so latency and dense size do not change; "
    "use structured pruning (--prune-backend torch-pruning) to remove whole channels",
)


@hookimpl
def register_techniques(register: Any) -> None:
    register(UNSTRUCTURED)


@hookimpl
def prune(model: Any, options: dict[str, Any]) -> Any:
    import torch
    from torch.nn.utils import prune as torch_prune

    from model_opt.errors import TechniqueError
    from model_opt.modules import excluded

    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
        and isinstance(getattr(module, "weight", None), torch.nn.Parameter)
        and not excluded(name, options["exclude"])
    ]
    if not targets:
        raise TechniqueError("the model has no Linear or Conv layer to prune",
                             "basic unstructured pruning works on Linear and Conv weights")
    amount = options["amount"]
    random = options["criterion"] == "random"
    if options["scope"] == "global":
        method = torch_prune.RandomUnstructured if random else torch_prune.L1Unstructured
        torch_prune.global_unstructured([(m, "weight") for _, m in targets], pruning_method=method, amount=amount)
    else:
        for _, module in targets:
            if random:
                torch_prune.random_unstructured(module, "weight", amount=amount)
            else:
                torch_prune.l1_unstructured(module, "weight", amount=amount)
    zeroed = total = 0
    for _, module in targets:
        torch_prune.remove(module, "weight")  # make the mask permanent; drops weight_orig and the hook
        zeroed += int((module.weight == 0).sum())
        total += module.weight.numel()
    return model, {
        "layers": len(targets),
        "sparsity": round(zeroed / total, 4),
        "zeroed_weights": zeroed,
        "note": "dense shapes are unchanged: expect no speed-up or size saving without a sparse runtime",
    }


@hookimpl
def restore(model: Any) -> Any:
    """Zeroed weights keep every shape: the architecture is the original one, and the weights carry the zeros."""
    return model
