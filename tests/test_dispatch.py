"""A technique call reaches only its own plugin; wrappers of every plugin see every call."""

from __future__ import annotations

import torch
from helpers import plugin_module
from model_opt.hookspecs import hookimpl
from model_opt.plugins import PluginManager
from model_opt.registry import Technique
from model_opt.techniques import Pruner


def test_only_the_registering_plugin_runs_and_wrappers_observe(monkeypatch) -> None:
    calls: list[str] = []

    @hookimpl
    def register_techniques(register):
        register(Technique("prune", "other", "noop", "does nothing", speeds_up=()))

    @hookimpl
    def prune(model, technique, options, context):
        calls.append(f"other:{technique.name}")
        return model, {"by": "other"}

    @hookimpl(wrapper=True)
    def observe(model, technique, options, context):
        calls.append(f"before:{technique.name}")
        result = yield
        calls.append(f"after:{technique.name}")
        return result

    manager = PluginManager(load_entry_points=False)
    manager.register(plugin_module("other", register_techniques=register_techniques, prune=prune), "other")
    manager.register(plugin_module("observer", prune=observe), "observer")
    import model_opt.plugins as plugins

    monkeypatch.setattr(plugins, "_MANAGER", manager)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    Pruner().prune_model(model, amount=0.5)
    assert calls == ["before:prune:basic:unstructured", "after:prune:basic:unstructured"]
    calls.clear()
    pruner = Pruner()
    pruner.prune_model(model, prune_type="noop", backend="other", amount=None)
    assert calls == ["before:prune:other:noop", "other:prune:other:noop", "after:prune:other:noop"]
    assert pruner.info == {"by": "other"}


def test_decomposer_dispatches_to_the_registering_plugin(monkeypatch) -> None:
    from model_opt.registry import Option
    from model_opt.techniques import Decomposer

    @hookimpl
    def register_techniques(register):
        register(Technique("decompose", "toy", "svd", "rank-k SVD of one Linear",
                           options=(Option("rank_ratio", float, 0.5),)))

    @hookimpl
    def decompose(model, technique, options, context):
        weight = model.weight.detach()
        rank = max(1, int(options["rank_ratio"] * min(weight.shape)))
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        first = torch.nn.Linear(weight.shape[1], rank, bias=False)
        second = torch.nn.Linear(rank, weight.shape[0], bias=model.bias is not None)
        first.weight.data = vh[:rank]
        second.weight.data = u[:, :rank] * s[:rank]
        if model.bias is not None:
            second.bias.data = model.bias.detach().clone()
        return torch.nn.Sequential(first, second), {"rank": rank}

    manager = PluginManager(load_entry_points=False)
    manager.register(plugin_module("toy", register_techniques=register_techniques, decompose=decompose), "toy")
    import model_opt.plugins as plugins

    monkeypatch.setattr(plugins, "_MANAGER", manager)
    layer = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    decomposer = Decomposer()
    full = decomposer.decompose_model(layer, method="svd", rank_ratio=1.0)
    torch.testing.assert_close(full(x), layer(x), atol=1e-5, rtol=1e-5)
    assert decomposer.info == {"rank": 16}


def test_register_commands_adds_a_cli_command() -> None:
    import typer
    from typer.testing import CliRunner

    @hookimpl
    def register_commands(app):
        @app.command()
        def hello(name: str) -> None:
            typer.echo(f"hello {name}")

    manager = PluginManager(load_entry_points=False)
    manager.register(plugin_module("greeter", register_commands=register_commands), "greeter")
    app = typer.Typer()

    @app.command()
    def other() -> None:
        pass

    manager.register_commands(app)
    result = CliRunner().invoke(app, ["hello", "world"])
    assert result.exit_code == 0 and result.stdout.strip() == "hello world"


def test_load_model_hook_opens_a_plugin_owned_format(monkeypatch, tmp_path) -> None:
    import model_opt

    @hookimpl
    def load_model(path):
        if path.suffix != ".lin":
            return None
        out_features, in_features = map(int, path.read_text().split())
        return torch.nn.Linear(in_features, out_features)

    manager = PluginManager(load_entry_points=False)
    manager.register(plugin_module("linfmt", load_model=load_model), "linfmt")
    import model_opt.plugins as plugins

    monkeypatch.setattr(plugins, "_MANAGER", manager)
    (tmp_path / "m.lin").write_text("3 5")
    model = model_opt.load(tmp_path / "m.lin")
    assert isinstance(model, torch.nn.Linear) and model.weight.shape == (3, 5)


def _acme(calls: list[str], fail_in_wrapper: bool = False):
    """A third-party plugin as CONTRIBUTING.md shows: its own prune technique and an observing prune wrapper."""
    from model_opt.registry import Option

    @hookimpl
    def register_techniques(register):
        register(Technique("prune", "acme", "shrink_mlp", "shrink MLPs", options=(Option("width", int, 4),),
                           speeds_up=()))

    @hookimpl
    def prune(model, technique, options, context):
        calls.append(f"acme prune width={options['width']}")
        return model, {"by": "acme"}

    @hookimpl(wrapper=True, specname="prune")
    def observe_prune(model, technique, options, context):
        calls.append(f"acme observes {technique.name}")
        if fail_in_wrapper:
            raise RuntimeError("tracking server down")
        return (yield)

    return plugin_module("acme", register_techniques=register_techniques, prune=prune, observe_prune=observe_prune)


def test_a_plugin_that_wraps_and_implements_does_not_take_over_other_techniques(monkeypatch) -> None:
    calls: list[str] = []
    manager = PluginManager(load_entry_points=False)
    manager.register(_acme(calls), "acme")
    import model_opt.plugins as plugins

    monkeypatch.setattr(plugins, "_MANAGER", manager)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    pruner = Pruner()
    pruner.prune_model(model, amount=0.5, backend="basic")
    assert calls == ["acme observes prune:basic:unstructured"]
    assert pruner.info["sparsity"] == 0.5
    calls.clear()
    pruner.prune_model(model, prune_type="shrink_mlp", backend="acme", amount=None, width=2)
    assert calls == ["acme observes prune:acme:shrink_mlp", "acme prune width=2"]


def test_a_failing_wrapper_is_named(monkeypatch) -> None:
    import pytest
    from model_opt.errors import TechniqueError

    manager = PluginManager(load_entry_points=False)
    manager.register(_acme([], fail_in_wrapper=True), "acme")
    import model_opt.plugins as plugins

    monkeypatch.setattr(plugins, "_MANAGER", manager)
    with pytest.raises(TechniqueError, match=r"^plugin 'acme', which wraps the prune hook, failed around "
                                             r"prune:basic:unstructured \(RuntimeError: tracking server down\); "
                                             r"fix or uninstall 'acme'; prune:basic:unstructured itself did not fail$"):
        Pruner().prune_model(torch.nn.Linear(4, 4), amount=0.5)


def test_a_technique_registered_twice_is_flagged_in_plugins() -> None:
    @hookimpl
    def register_techniques(register):
        register(Technique("prune", "basic", "unstructured", "a copy", speeds_up=()))

    manager = PluginManager(load_entry_points=False)
    manager.register(plugin_module("copycat", register_techniques=register_techniques), "copycat")
    for name in ("basic", "copycat"):
        record = manager.records[name]
        assert record.status == "conflict"
        assert "prune:basic:unstructured is also registered by" in record.reason


def test_a_load_model_hook_that_raises_names_its_plugin(monkeypatch, tmp_path) -> None:
    import model_opt
    import pytest
    from model_opt.errors import ModelLoadError

    @hookimpl
    def load_model(path):
        raise ValueError("bad header")

    manager = PluginManager(load_entry_points=False)
    manager.register(plugin_module("fmt", load_model=load_model), "fmt")
    import model_opt.plugins as plugins

    monkeypatch.setattr(plugins, "_MANAGER", manager)
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"^plugin 'fmt' could not open m.bin \(ValueError: bad header\)"):
        model_opt.load(tmp_path / "m.bin")
