"""Structured pruning with torch-pruning, for CNNs and (timm) Vision Transformers."""

from __future__ import annotations

import warnings
from itertools import islice
from typing import Any

import torch
import torch_pruning as tp
from model_opt.errors import TechniqueError, describe
from model_opt.measure import call_model
from model_opt.modelinfo import output_layers, run_checked
from model_opt.modules import structure_changes, structure_snapshot
from model_opt.result import TechniqueResult
from torch import nn


def importance(criterion: str) -> Any:
    imp = tp.importance
    return {
        "magnitude": lambda: imp.GroupMagnitudeImportance(p=2),
        "l1": lambda: imp.GroupMagnitudeImportance(p=1),
        "taylor": lambda: imp.GroupTaylorImportance(),
        "group_norm": lambda: imp.GroupMagnitudeImportance(p=2, normalizer=None),
        "bn_scale": lambda: imp.BNScaleImportance(),
        "random": lambda: imp.RandomImportance(),
    }[criterion]()


def attention_modules(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """Attention blocks with a fused qkv Linear and a num_heads attribute (timm ViT, DeiT, ...)."""
    return {m.qkv: m for m in model.modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)}


HF_PROJECTIONS = ("query", "key", "value")


def hf_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Hugging Face BERT-family self-attention: query/key/value Linears and num_attention_heads."""
    return [m for m in model.modules()
            if all(isinstance(getattr(m, n, None), nn.Linear) for n in HF_PROJECTIONS)
            and isinstance(getattr(m, "num_attention_heads", None), int)]


def hf_models(model: nn.Module) -> dict[str, nn.Module]:
    """Every Hugging Face model in ``model`` by its module name ("" for the model itself): a module holding a
    transformers config with a hidden size, the outermost of each (a classifier's inner BertModel shares its
    config). Found at any depth, so a model wrapped in the user's own module (a pooling head, two encoders)
    is protected and updated like a bare one."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if not (hasattr(config, "to_dict") and isinstance(getattr(config, "hidden_size", None), int)):
            continue
        if any(root == "" or name.startswith(f"{root}.") for root in found):
            continue
        found[name] = module
    return found


def residual_writers(model: nn.Module, projections: set[nn.Module]) -> list[nn.Module]:
    """Layers whose outputs set each Hugging Face model's hidden size (config.hidden_size): the attention
    output and MLP output projections, the pooler, the embeddings. Pruning keeps them, so whole heads and FFN
    width go while the residual stream keeps its width, in every HF model the user's module holds."""
    kept: list[nn.Module] = []
    for root in hf_models(model).values():
        hidden = root.config.hidden_size
        kept += [m for m in root.modules() if (isinstance(m, nn.Linear) and m.out_features == hidden
                                               and m not in projections) or isinstance(m, nn.Embedding)]
    return kept


def update_hf_attention(model: nn.Module, attention: list[nn.Module], num_heads: dict[nn.Module, int]) -> None:
    """The three attributes BERT-family attention reshapes with."""
    for m in attention:
        m.num_attention_heads = num_heads[m.query]
        m.attention_head_size = m.query.out_features // m.num_attention_heads
        m.all_head_size = m.query.out_features


def config_changes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per Hugging Face model (by module name): config.num_attention_heads / intermediate_size after pruning,
    where every layer of that model agrees."""
    changes: dict[str, dict[str, int]] = {}
    for name, root in hf_models(model).items():
        attention = hf_attention_modules(root)
        if not attention:
            continue
        change: dict[str, int] = {}
        heads = {m.num_attention_heads for m in attention}
        if len(heads) == 1:
            change["num_attention_heads"] = heads.pop()
        widths = {m.dense.out_features for m in root.modules()
                  if type(m).__name__.endswith("Intermediate") and isinstance(getattr(m, "dense", None), nn.Linear)}
        if len(widths) == 1:
            change["intermediate_size"] = widths.pop()
        changes[name] = change
    return changes


def apply_config(model: nn.Module, state: dict[str, Any]) -> None:
    """Set each HF model's config from a step's state: ``configs`` (per module name), or the older flat
    ``config`` of the model itself."""
    per_model = dict(state.get("configs") or {})
    if state.get("config") and not per_model:
        per_model[""] = state["config"]
    modules = dict(model.named_modules())
    for name, changes in per_model.items():
        config = getattr(modules.get(name), "config", None)
        if config is None:
            raise TechniqueError(f"the recorded config of {name or 'the model'} names no Hugging Face model here",
                                 "pass the architecture the file was made from")
        for key, value in changes.items():
            setattr(config, key, value)


def labelled_batches(context: Any, limit: int) -> list[tuple[Any, torch.Tensor]]:
    pairs = [(inputs, labels) for inputs, labels in islice(context.require_labelled_data(
        "torch-pruning's taylor criterion"), limit)]
    if not pairs:
        raise TechniqueError("labelled_data(dataset_path) yielded nothing", "make it yield (inputs, labels) pairs")
    return pairs


def prune_structured(model: nn.Module, options: dict[str, Any], context: Any) -> tuple[nn.Module, dict]:
    example = context.require_example_input()
    from model_opt.modules import excluded

    modules = dict(model.named_modules())
    run_checked(model, example)
    heads = output_layers(model, example)
    chosen = [n for n in modules if n and excluded(n, options["exclude"])]
    ignored_names = list(dict.fromkeys([*heads, *chosen]))
    attention = attention_modules(model)
    hf_attention = hf_attention_modules(model)
    num_heads: dict[nn.Module, int] = {qkv: attn.num_heads for qkv, attn in attention.items()}
    num_heads.update({getattr(m, n): m.num_attention_heads for m in hf_attention for n in HF_PROJECTIONS})
    keep = residual_writers(model, set(num_heads)) if hf_attention else []
    names_of = {id(m): n for n, m in model.named_modules()}
    ignored_names = list(dict.fromkeys([*ignored_names, *(names_of[id(m)] for m in keep)]))
    output_transform = None if isinstance(run_checked(model, example), torch.Tensor) else (lambda out: out[0])
    base_ops, base_params = tp.utils.count_ops_and_params(model, example)
    before = structure_snapshot(model)
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            pruner = tp.pruner.BasePruner(
                model, example, importance=importance(options["criterion"]),
                global_pruning=options["global_pruning"], pruning_ratio=options["amount"],
                iterative_steps=options["iterative_steps"], ignored_layers=[modules[n] for n in ignored_names],
                round_to=options["round_to"] or None,
                num_heads=num_heads, output_transform=output_transform,
                prune_num_heads=bool(num_heads) and options["prune_heads"],
                prune_head_dims=not options["prune_heads"],
                head_pruning_ratio=options["amount"] if options["prune_heads"] else 0.0,
            )
    except Exception as exc:
        raise TechniqueError(
            f"torch-pruning could not trace the model ({describe(exc)})",
            "add the module that fails to --prune-opt exclude=..., or pass an example input of the right shape",
        ) from None
    for _ in range(options["iterative_steps"]):
        if options["criterion"] == "taylor":
            model.zero_grad()
            with torch.enable_grad():
                for inputs, labels in labelled_batches(context, options["calibration_batches"]):
                    loss = nn.functional.cross_entropy(call_model(model, inputs), labels.to(_device(model)))
                    loss.backward()
        with torch.enable_grad():
            pruner.step()
    model.zero_grad(set_to_none=True)
    for qkv, attn in attention.items():
        attn.num_heads = pruner.num_heads[qkv]
        attn.head_dim = qkv.out_features // (3 * attn.num_heads)
        if hasattr(attn, "attn_dim"):
            attn.attn_dim = attn.num_heads * attn.head_dim
    update_hf_attention(model, hf_attention, pruner.num_heads)
    configs = config_changes(model)
    apply_config(model, {"configs": configs})
    ops, params = tp.utils.count_ops_and_params(model, example)
    info: dict[str, Any] = {
        "channel_ratio": options["amount"],
        "params_ratio": round(params / base_params, 4),
        "flops_ratio": round(ops / base_ops, 4) if base_ops else None,
        "ignored_layers": ignored_names,
        "note": f"channel ratio {options['amount']} left {params / base_params:.0%} of the parameters "
                "(a layer loses channels on both its input and its output)",
    }
    if attention:
        info["attention_heads"] = {name: attn.num_heads for name, attn in
                                   ((n, m) for n, m in model.named_modules() if m in attention.values())}
    if hf_attention:
        info["attention_heads"] = {names_of[id(m)]: m.num_attention_heads for m in hf_attention}
        info["config"] = configs[""] if list(configs) == [""] else configs
    return TechniqueResult(model, info, {**structure_changes(before, model), "configs": configs})


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
