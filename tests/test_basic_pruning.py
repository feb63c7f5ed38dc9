"""The core's basic unstructured pruner through the seed API."""

from __future__ import annotations

import pytest
import torch
from model_opt.errors import BackendNotInstalled, TechniqueError, UsageError
from model_opt.techniques import Pruner
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def test_prune_model_zeroes_smallest_weights_and_leaves_no_hooks() -> None:
    model = mlp()
    before = model[0].weight.detach().clone()
    pruned = Pruner().prune_model(model, amount=0.5, criterion="l1", prune_type="unstructured")
    for layer in (pruned[0], pruned[2]):
        assert (layer.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
        assert not layer._forward_pre_hooks
        assert not hasattr(layer, "weight_orig") and not hasattr(layer, "weight_mask")
        assert isinstance(layer.weight, nn.Parameter)
    kept = pruned[0].weight != 0
    # l1: every kept weight is at least as large as every removed one
    assert before.abs()[kept].min() >= before.abs()[~kept].max()
    assert "weight_orig" not in "".join(pruned.state_dict())


def test_global_scope_and_exclude() -> None:
    model = mlp()
    pruner = Pruner()
    pruned = pruner.prune_model(model, amount=0.3, criterion="l1", scope="global", exclude=["2"])
    assert (pruned[2].weight != 0).all()
    assert pruner.info["layers"] == 1
    assert pruner.info["sparsity"] == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("amount", [0.0, 1.0, 1.5, -0.1])
def test_amount_outside_open_interval_is_refused(amount: float) -> None:
    with pytest.raises(UsageError, match=r"outside \(0, 1\); pass a value in \(0, 1\)"):
        Pruner().prune_model(mlp(), amount=amount)


def test_unknown_criterion_lists_choices() -> None:
    with pytest.raises(UsageError, match=r"'l2' .*choose one of: l1, magnitude, random"):
        Pruner().prune_model(mlp(), amount=0.5, criterion="l2")


def test_model_without_prunable_layers_is_refused() -> None:
    with pytest.raises(TechniqueError, match="no Linear or Conv layer to prune"):
        Pruner().prune_model(nn.Sequential(nn.ReLU()), amount=0.5)


def test_structured_without_its_backend_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """The core knows plugins only as model-opt's extras: a method no installed plugin offers names them."""
    import model_opt.plugins as plugins
    from model_opt.errors import UsageError
    from model_opt.plugins import PluginManager

    monkeypatch.setattr(plugins, "_MANAGER", PluginManager(load_entry_points=False))
    with pytest.raises(UsageError, match=r"unknown prune method 'structured' .*more methods come with plugins not "
                                         r'installed here \(.*torch-pruning.*\): pip install "model-opt\[all\]"'):
        Pruner().prune_model(mlp(), amount=0.3, criterion="magnitude", prune_type="structured",
                             example_input=torch.randn(1, 32))
    with pytest.raises(BackendNotInstalled, match=r'pip install "model-opt\[torch-pruning\]"'):
        Pruner().prune_model(mlp(), amount=0.3, prune_type="structured", backend="torch-pruning",
                             example_input=torch.randn(1, 32))
