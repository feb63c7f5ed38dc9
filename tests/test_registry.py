"""Technique records, option validation and name resolution with suggestions."""

from __future__ import annotations

import types

import pytest
from helpers import plugin_module
from model_opt.errors import BackendNotInstalled, UsageError
from model_opt.hookspecs import hookimpl
from model_opt.plugins import PluginManager
from model_opt.registry import Option, Registry, Technique


def make(backend: str = "b", method: str = "m", plugin: str = "p", **kw) -> Technique:
    return Technique(kind="prune", backend=backend, method=method, summary="s", plugin=plugin, **kw)


def test_option_coerces_cli_strings_and_checks_ranges() -> None:
    amount = Option("amount", float, 0.5, minimum=0, maximum=1, exclusive_minimum=True, exclusive_maximum=True)
    assert amount.coerce("0.3") == pytest.approx(0.3)
    with pytest.raises(UsageError, match=r"option 'amount' is 1.5, outside \(0, 1\); pass a value in \(0, 1\)"):
        amount.coerce("1.5")
    with pytest.raises(UsageError, match="expects float, got 'abc'"):
        amount.coerce("abc")
    assert Option("flag", bool, False).coerce("yes") is True
    assert Option("names", list, []).coerce("head, fc") == ["head", "fc"]


def test_choices_error_lists_them_and_suggests_the_closest() -> None:
    criterion = Option("criterion", str, "l1", choices=("l1", "magnitude", "random"))
    with pytest.raises(UsageError) as err:
        criterion.coerce("magnitud")
    assert str(err.value) == ("unknown option 'criterion' value 'magnitud' (did you mean 'magnitude'?); "
                              "choose one of: l1, magnitude, random")


def test_unknown_option_name_is_refused_with_suggestion() -> None:
    technique = make(options=(Option("amount", float, 0.5),))
    with pytest.raises(UsageError, match=r"unknown option for b m 'amout' \(did you mean 'amount'\?\)"):
        technique.resolve_options({"amout": 0.1})
    assert technique.resolve_options({}) == {"amount": 0.5}


def test_find_suggests_closest_backend_and_method() -> None:
    registry = Registry()
    registry.add(make("basic", "unstructured"))
    with pytest.raises(UsageError,
                       match=r"unknown prune backend 'bsic' \(did you mean 'basic'\?\); choose one of: basic"):
        registry.find("prune", "bsic")
    with pytest.raises(UsageError, match=r"unknown prune method of backend 'basic' 'unstructred' "
                                         r"\(did you mean 'unstructured'\?\)"):
        registry.find("prune", "basic", "unstructred")
    with pytest.raises(UsageError, match="unknown technique kind 'prun'"):
        registry.find("prun")


def test_known_backend_not_installed_names_the_extra() -> None:
    """The core knows first-party backends only as model-opt's extras (its distribution metadata), not
    which plugin offers which method."""
    registry = Registry()
    with pytest.raises(UsageError, match=r"unknown quantize method 'int8_dynamic'; choose one of: none installed; "
                                         r"more methods come with plugins not installed here \(.*torchao\): pip "
                                         r'install "model-opt\[all\]"'):
        registry.find("quantize", None, "int8_dynamic")
    with pytest.raises(BackendNotInstalled, match=r'pip install "model-opt\[nncf\]"'):
        registry.find("quantize", "nncf")


def test_missing_required_package_names_the_extra() -> None:
    technique = make("nncf", "int8_static", requires=("no_such_package_xyz",), extra="nncf")
    with pytest.raises(BackendNotInstalled, match=r'needs the package no_such_package_xyz.*model-opt\[nncf\]'):
        technique.validate_environment()


def _plugin(name: str, technique: Technique) -> types.ModuleType:
    @hookimpl
    def register_techniques(register):
        register(technique)

    return plugin_module(name, register_techniques=register_techniques)


def test_two_plugins_registering_the_same_technique_is_an_error_naming_both() -> None:
    manager = PluginManager(load_entry_points=False)
    manager.register(_plugin("first", make("same", "m")), "first")
    manager.register(_plugin("second", make("same", "m")), "second")
    with pytest.raises(UsageError, match="same m is registered by two plugins: first and second"):
        manager.registry.find("prune", "same", "m")
    assert manager.registry.find("prune", "basic", "unstructured").plugin == "basic"


def test_a_plugin_whose_registration_raises_is_broken_and_others_work() -> None:
    @hookimpl
    def register_techniques(register):
        raise RuntimeError("backend exploded")

    manager = PluginManager(load_entry_points=False)
    record = manager.register(plugin_module("bad", register_techniques=register_techniques), "bad")
    assert record.status == "broken"
    assert "backend exploded" in record.reason
    assert manager.registry.find("prune", "basic").method == "unstructured"


def test_plugin_with_missing_package_is_unavailable_with_hint() -> None:
    manager = PluginManager(load_entry_points=False)
    record = manager.register(_plugin("ghost", make("ghost", "m", requires=("no_such_package_xyz",))), "ghost")
    assert record.status == "unavailable"
    assert record.reason == "missing package: no_such_package_xyz"
    assert record.hint == 'pip install "ghost"'  # not a model-opt extra: its own distribution


def test_a_third_party_technique_can_be_the_default_for_a_method_and_be_recommended() -> None:
    """Everything a first-party backend declares, a third party can: the default for a method name, and
    its place in the recommendation for a family."""
    import torch
    from helpers import plugin_module
    from model_opt.hookspecs import hookimpl
    from model_opt.plugins import PluginManager
    from model_opt.recommend import recommend
    from model_opt.registry import Recommended, Technique

    @hookimpl
    def register_techniques(register):
        register(Technique("quantize", "acme", "fast8", "acme int8", default=True, families=("transformer",),
                           recommended=(Recommended("transformer", "acme's kernels", {"level": 2}, rank=1),)))

    @hookimpl
    def register_other(register):
        register(Technique("quantize", "other", "fast8", "another int8"))

    manager = PluginManager(load_entry_points=False)
    manager.register(plugin_module("acme", register_techniques=register_techniques), "acme")
    manager.register(plugin_module("other", register_techniques=register_other), "other")
    assert manager.registry.find("quantize", None, "fast8").backend == "acme"
    family, _, recommendations = recommend(torch.nn.Sequential(torch.nn.Linear(4, 4)), "cpu", manager)
    assert family == "transformer"
    first = recommendations[0]
    assert (first.technique.backend, first.technique.method, first.why, first.options, first.available) == (
        "acme", "fast8", "acme's kernels", {"level": 2}, True)


def test_an_option_value_can_make_a_technique_speed_up_and_the_report_warns_only_without_it() -> None:
    from model_opt.report import Measurement, Report
    from model_opt.speed_advice import speed_warnings

    weights = make(speeds_up=(), speeds_up_with={"runtime": {"openvino": ("cpu",)}}, speed_note="decompressed")
    assert weights.speeds_up_on({"runtime": "openvino"}) == ("cpu",)
    assert weights.speeds_up_on({"runtime": "torch"}) == () == weights.speeds_up_on()
    report = Report(model="m", device="cpu", threads=2, higher_is_better=True,
                    before=Measurement({"accuracy": 1.0}, "accuracy", 10, 10, 40))
    assert speed_warnings(report, [(weights, {"runtime": "openvino"})]) == []
    assert speed_warnings(report, [(weights, {"runtime": "torch"})]) == [
        "b m does not reduce latency on cpu: decompressed"]
