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
