"""Hook implementations of the torch-pruning plugin: structured pruning of channels and heads."""

from __future__ import annotations

from typing import Any

from model_opt.hookspecs import hookimpl
from model_opt.registry import Option, Recommended, Technique

CRITERIA = ("magnitude", "l1", "taylor", "group_norm", "bn_scale", "random")

STRUCTURED = Technique(
    kind="prune",
    backend="torch-pruning",
    method="structured",
    summary="Remove whole channels, MLP width and attention heads with torch-pruning's dependency graph.",
    options=(
        Option("amount", float, 0.3, flag="--prune-amount",
               help="fraction of channels (and heads) to remove; 0.5 removes about 3/4 of "
               "the parameters", minimum=0.0, maximum=1.0, exclusive_minimum=True, exclusive_maximum=True),
        Option("criterion", str, "magnitude", flag="--prune-criterion",
               help="magnitude (group L2), l1, taylor (needs labelled_data in "
               "the test script), group_norm (un-normalized group L2), bn_scale, random", choices=CRITERIA),
        Option("global_pruning", bool, False, "rank channels across layers instead of per layer"),
        Option("iterative_steps", int, 1, "reach the amount in this many steps", minimum=1),
        Option("exclude", list, [], "module names (or prefixes) to leave unpruned (the classifier head is found "
               "and left automatically)", aliases=("ignored_layers",)),
        Option("round_to", int, 0, "keep channel counts multiples of this (0: no rounding)", minimum=0),
        Option("prune_heads", bool, True, "on attention modules, remove whole heads (else head dims)"),
        Option("calibration_batches", int, 4, "labelled batches for taylor", minimum=1),
    ),
    needs=("example_input",),
    requires=("torch_pruning",),
    search_space={"amount": (0.1, 0.2, 0.3, 0.4, 0.5)},
    families=("cnn", "vit", "hybrid", "transformer"),
    recommended=(
        Recommended("cnn", "removing 30-50% of channels cuts FLOPs and latency for real", {"amount": 0.3}, rank=20),
        Recommended("hybrid", "structured pruning of the convolutional parts", {"amount": 0.3}, rank=20),
        Recommended("transformer", "whole attention heads and FFN width, with recovery fine-tuning (train())",
                    {"amount": 0.3}, rank=30),
    ),
    speeds_up=("cpu", "cuda"),
)


@hookimpl
def register_techniques(register: Any) -> None:
    register(STRUCTURED)


@hookimpl
def prune(model: Any, technique: Technique, options: dict[str, Any], context: Any) -> Any:
    from .structured import prune_structured

    return prune_structured(model, options, context)


@hookimpl
def restore(model: Any, technique: Technique, options: dict[str, Any], state: dict[str, Any], context: Any) -> Any:
    """Give the fresh architecture the pruned shapes (and head counts) recorded when it was pruned."""
    from model_opt.modules import rebuild_structure

    from .structured import apply_config

    apply_config(model, state)
    return rebuild_structure(model, state)
