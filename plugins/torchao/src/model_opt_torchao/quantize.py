"""torchao quantization through ``quantize_`` with config classes, and our measured autoquant."""

from __future__ import annotations

import copy
import time
from functools import partial
from typing import Any

import torch
from model_opt.errors import DeviceError, TechniqueError, UsageError, first_line
from model_opt.measure import compiled_for_inference
from model_opt.modelinfo import output_layers, run_checked
from model_opt.modules import excluded
from torch import nn

CPU_METHODS = ("int8_weight_only", "int8_dynamic")
CUDA_METHODS = ("int4_weight_only", "float8_dynamic")


def config_for(method: str, options: dict[str, Any]) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if method == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if method == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if method == "int4_weight_only":
        return Int4WeightOnlyConfig(group_size=options.get("group_size", 128))
    if method == "float8_dynamic":
        return Float8DynamicActivationFloat8WeightConfig()
    raise UsageError(f"unknown torchao method {method!r}", f"choose one of: {', '.join(CPU_METHODS + CUDA_METHODS)}")


def check_device(method: str, device: str) -> None:
    if method in CUDA_METHODS and not device.startswith("cuda"):
        raise DeviceError(f"torchao {method} runs only on a CUDA GPU", "use --device cuda on a machine with a GPU")
    if method == "float8_dynamic":
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        if (major, minor) < (8, 9):
            raise DeviceError(f"torchao float8_dynamic needs a GPU of compute capability 8.9 or newer; this one "
                              f"is {major}.{minor}", "use int8_dynamic or int8_weight_only here")


def _device(model: nn.Module) -> str:
    for tensor in model.parameters():
        return str(tensor.device)
    return "cpu"


def eligible_layers(model: nn.Module, options: dict[str, Any], example: Any) -> tuple[list[str], dict[str, str]]:
    """Linear layers to quantize, and the skipped ones with the reason."""
    heads = set(output_layers(model, example)) if options["skip_head"] else set()
    chosen, skipped = [], {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if name in heads:
            skipped[name] = "classifier head (skip_head)"
        elif excluded(name, options["exclude"]):
            skipped[name] = "excluded"
        elif min(module.in_features, module.out_features) < options["min_features"]:
            skipped[name] = f"min(in, out) below min_features {options['min_features']}"
        else:
            chosen.append(name)
    return chosen, skipped


def apply_config(model: nn.Module, method: str, names: list[str], options: dict[str, Any]) -> None:
    from torchao.quantization import quantize_

    wanted = set(names)
    quantize_(model, config_for(method, options), filter_fn=lambda module, fqn: fqn in wanted)
    make_picklable(model)


def make_picklable(model: nn.Module) -> None:
    """torchao sets a per-instance ``extra_repr`` (a method over a functools.partial) that pickle cannot save;
    it only changes how the module prints, so drop it and keep the model saveable with torch.save."""
    for module in model.modules():
        module.__dict__.pop("extra_repr", None)


def quantize_method(model: nn.Module, method: str, options: dict[str, Any], context: Any) -> tuple[nn.Module, dict]:
    device = context.device or _device(model)
    check_device(method, device)
    chosen, skipped = eligible_layers(model, options, context.example_input)
    if not chosen:
        raise TechniqueError(f"the model has no Linear layer that torchao {method} can quantize "
                             f"({len(skipped)} skipped: {', '.join(skipped) or 'none found'})",
                             "torchao quantizes nn.Linear layers; check skip_head/exclude/min_features")
    if options.get("qat_steps"):
        model = train_quantization_aware(model, method, chosen, options["qat_steps"], context)
    apply_config(model, method, chosen, options)
    info = {"method": method, "quantized": chosen, "skipped": skipped,
            "runtime_note": "fast on CPU only under torch.compile with freezing"}
    if options.get("qat_steps"):
        info["quantization_aware_training"] = {"steps": options["qat_steps"]}
    return model, info


def train_quantization_aware(model: nn.Module, method: str, names: list[str], steps: int, context: Any) -> nn.Module:
    """torchao QAT: the chosen Linear layers simulate ``method``'s int8 (per-channel symmetric weights; per-token
    activations for int8_dynamic, asymmetric as torchao simulates them) while the test script's train() runs,
    then become plain Linear layers again with the trained weights, ready for the post-training config."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    wanted = set(names)
    weights = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    # torchao simulates per-token int8 activations only asymmetric (its int8_dynamic runs them symmetric)
    activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) \
        if method == "int8_dynamic" else None
    quantize_(model, QATConfig(activation_config=activations, weight_config=weights, step="prepare"),
              filter_fn=lambda module, fqn: fqn in wanted)
    model = context.train_for(model, steps, "trains the int8-simulated model").eval()
    quantize_(model, QATConfig(step="convert"), filter_fn=lambda module, fqn: fqn in wanted)
    return model


# -- autoquant ------------------------------------------------------------------------------------


def _capture_inputs(model: nn.Module, names: list[str], example: Any) -> dict[str, torch.Tensor]:
    inputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].detach()))
             for n in names]
    try:
        run_checked(model, example)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def _time(fn: Any, repeats: int = 10) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2] * 1000


def _candidate(layer: nn.Linear, method: str, options: dict[str, Any], use_compile: bool) -> Any:
    wrapper = nn.Sequential(copy.deepcopy(layer))
    if method != "float":
        from torchao.quantization import quantize_

        quantize_(wrapper, config_for(method, options))
        make_picklable(wrapper)
    # (compiled as every model-opt compile: one nn.Sequential class for all candidates, over Dynamo's default limit)
    return compiled_for_inference(wrapper) if use_compile else wrapper


def autoquant(model: nn.Module, options: dict[str, Any], context: Any) -> tuple[nn.Module, dict]:
    """For each group of same-shaped Linear layers, keep the fastest method within ``tolerance``."""
    example = context.require_example_input()
    device = context.device or _device(model)
    available = ["float", *CPU_METHODS]
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        available.append("int4_weight_only")
        if (major, minor) >= (8, 9):
            available.append("float8_dynamic")
    wanted = options["candidates"] or available
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise UsageError(f"autoquant candidate {unknown[0]!r} does not run on {device}",
                         f"choose from: {', '.join(available)}")
    chosen, skipped = eligible_layers(model, options, example)
    if not chosen:
        raise TechniqueError("the model has no Linear layer that autoquant can quantize",
                             "torchao quantizes nn.Linear layers; check skip_head/exclude/min_features")
    inputs = _capture_inputs(model, chosen, example)
    modules = dict(model.named_modules())
    groups: dict[tuple, list[str]] = {}
    for name in chosen:
        if name not in inputs:
            skipped[name] = "not called on the example input"
            continue
        layer = modules[name]
        key = (layer.in_features, layer.out_features, layer.bias is not None, tuple(inputs[name].shape),
               layer.weight.dtype)
        groups.setdefault(key, []).append(name)
    decisions: dict[str, dict[str, Any]] = {}
    plan: dict[str, list[str]] = {}
    for key, names in groups.items():
        first = modules[names[0]]
        x = inputs[names[0]]
        with torch.inference_mode():
            reference = first(x)
        trials = {}
        for method in ["float", *[m for m in wanted if m != "float"]]:
            try:
                candidate = _candidate(first, method, options, context.compile)
                ms = _time(partial(candidate, x))
                with torch.inference_mode():
                    out = candidate(x)
                error = ((out.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12)).item()
                trials[method] = {"ms": round(ms, 4), "error": round(error, 5)}
            except Exception as exc:  # a kernel this shape or device does not support
                trials[method] = {"error": None, "failed": first_line(exc, 120)}
        ok = {m: t for m, t in trials.items() if t.get("ms") is not None and t["error"] <= options["tolerance"]}
        best = min(ok, key=lambda m: ok[m]["ms"]) if ok else "float"
        shape = f"{key[0]}->{key[1]} input {list(key[3])}"
        decisions[shape] = {"choice": best, "layers": names, "trials": trials}
        if best != "float":
            plan.setdefault(best, []).extend(names)
    for method, names in plan.items():
        apply_config(model, method, names, options)
    return model, {
        "runtime": "compiled" if context.compile else "eager",
        "tolerance": options["tolerance"],
        "choices": decisions,
        "quantized": {m: n for m, n in plan.items()},
        "skipped": skipped,
        "changed": bool(plan),
        **({} if plan else {"note": "no quantized kernel was faster than float within the tolerance on this "
                                    "device and runtime, so every layer stays float"}),
    }
