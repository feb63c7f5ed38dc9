"""NNCF post-training int8 quantization of the model converted to OpenVINO, with optional accuracy control."""

from __future__ import annotations

from typing import Any

import torch
from model_opt.errors import TechniqueError
from model_opt.modelinfo import describe_input, run_checked
from model_opt.result import TechniqueResult
from torch import nn

from .openvino_module import OpenVINOModule, as_original_output, output_spec, ov_call, serialize, to_numpy
from .scope import ignored_scope


def convert(model: nn.Module, example: Any) -> Any:
    """torch -> OpenVINO; a failure names the unsupported op and leaves the input untouched."""
    import openvino as ov
    from model_opt.export import name_outputs, output_names

    try:
        converted = ov.convert_model(model, example_input=example)
        name_outputs(converted, output_names(model, example))  # the original's fields: last_hidden_state, ...
        return converted
    except Exception as exc:
        text = " ".join(str(exc).split())
        marker = next((line for line in str(exc).splitlines() if "aten::" in line or "not supported" in line), "")
        detail = " ".join(marker.split())[:200] or text[:200]
        raise TechniqueError(f"OpenVINO could not convert the model ({detail})",
                             "exclude or rewrite that op; the input model is untouched") from None


def quantize_int8(model: nn.Module, options: dict[str, Any], context: Any) -> tuple[nn.Module, dict]:
    import nncf

    example = context.require_example_input()
    calibration = [to_numpy(x) for x in context.calibration_inputs()]
    if not calibration:
        raise TechniqueError("calibration_data(dataset_path) yielded nothing",
                             "make it yield model inputs")
    first = next(iter(context.calibration_inputs()))
    run_checked(model, first, what="calibration data")
    shapes = {describe_input(x) for x in context.calibration_inputs()}
    kwargs: dict[str, Any] = {
        "subset_size": options["subset_size"],
        "fast_bias_correction": options["fast_bias_correction"],
        "preset": getattr(nncf.QuantizationPreset, options["preset"].upper()),
    }
    family = context.family
    model_type = options["model_type"]
    if model_type == "auto":  # NNCF's transformer rules keep attention accurate (benchmarks/RESULTS.md: MiniLM)
        model_type = "transformer" if family in ("transformer", "vit", "hybrid", "causal-lm") else "default"
    if model_type == "transformer":  # with SmoothQuant on the MatMuls first (NNCF applies it for transformers)
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            AdvancedSmoothQuantParameters,
        )

        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=options["smooth_quant_alpha"]))
    info: dict[str, Any] = {"calibration_batches": len(calibration), "calibration_shapes": sorted(shapes),
                            "model_type": model_type}
    if model_type == "transformer":
        info["smooth_quant_alpha"] = options["smooth_quant_alpha"] if options["smooth_quant_alpha"] >= 0 else "off"
    if family == "causal-lm" and callable(getattr(model, "generate", None)) and not options["qat_steps"]:
        return quantize_causal_lm(model, kwargs, example, context, info)
    if options["qat_steps"]:
        quantized = quantization_aware(model, options, kwargs, context, info)
    else:
        context.progress("converting to OpenVINO")
        ov_model = convert(model, example)
        float_ir = serialize(ov_model)  # (before NNCF runs): the float model in OpenVINO, for the report
        if options["exclude"]:
            kwargs["ignored_scope"] = ignored_scope(options["exclude"], openvino=True)
        dataset = nncf.Dataset(calibration)
        context.progress(f"NNCF int8 calibration on {len(calibration)} batches")
        quantized = nncf.quantize(ov_model, dataset, **kwargs)
        if context.max_accuracy_drop is not None and context.evaluate is not None and options["accuracy_control"]:
            quantized = _within_budget(nncf, ov_model, quantized, dataset, kwargs, model, context, info)
    config = {**compile_config(options, example), **outputs_of(model, example)}
    module = OpenVINOModule(quantized, compile_config=config)
    if not options["qat_steps"]:
        module.keep_float(float_ir)
    fq_layers, float_layers = quantized_layers(quantized)
    info.update({"runtime": "OpenVINO CPU", "compiled_with": module.describe_compile(),
                 "quantized_layers": len(fq_layers), "float_layers": float_layers,
                 "fake_quantize_ops": module.op_counts().get("FakeQuantize", 0)})
    return TechniqueResult(module, info, {"compile": config}, standalone=True)


def quantize_causal_lm(model: nn.Module, kwargs: dict[str, Any], example: Any, context: Any,
                       info: dict[str, Any]) -> TechniqueResult:
    """int8 weights and activations of a causal LM in OpenVINO with its KV cache as inputs and outputs (as NNCF's
    weight compression with runtime=openvino), calibrated on the prompts and on a decode step after each, so
    that the ranges cover both the prompt and the one-token steps with a past."""
    import nncf
    import numpy as np

    from .openvino_lm import OpenVINOCausalLM, convert_causal_lm, past_after

    ids = example.get("input_ids") if isinstance(example, dict) else example
    if not isinstance(ids, torch.Tensor):
        raise TechniqueError("int8_static converts a causal LM with its token ids as input, and the example input "
                             "has no input_ids tensor", "give the example input as {'input_ids': ...}")
    context.progress("converting the causal LM to OpenVINO with its KV cache as inputs and outputs")
    ov_model, layout = convert_causal_lm(model, ids)
    float_ir = serialize(ov_model)
    empty = [np.zeros((1, layout["heads"], 0, layout["head_dim"]), np.float32) for _ in range(2 * layout["layers"])]
    after = past_after(ov_model)
    items = []
    for batch in context.calibration_inputs():
        rows = torch.as_tensor(batch.get("input_ids") if isinstance(batch, dict) else batch)
        for row in rows.reshape(-1, rows.shape[-1]).numpy().astype(np.int64):
            split = max(1, len(row) // 2)
            prompt = [row[None, :split], np.ones((1, split), np.int64), *empty]
            past = after(row[None, :split], empty)
            items.append(prompt)
            if split < len(row):
                items.append([row[None, split:split + 1], np.ones((1, split + 1), np.int64), *past])
    if not items:
        raise TechniqueError("calibration_data(dataset_path) yielded nothing", "make it yield model inputs")
    context.progress(f"NNCF int8 calibration on {len(items)} prompts and decode steps")
    quantized = nncf.quantize(ov_model, nncf.Dataset(items), **{**kwargs, "subset_size": min(kwargs["subset_size"],
                                                                                             len(items))})
    module = OpenVINOCausalLM(quantized, compile_config={"kv": layout}).keep_float(float_ir)
    fq_layers, float_layers = quantized_layers(quantized)
    info.update({"calibration_items": len(items), "runtime": "OpenVINO CPU", "kv_cache": layout,
                 "compiled_with": module.describe_compile(), "quantized_layers": len(fq_layers),
                 "float_layers": float_layers, "fake_quantize_ops": module.op_counts().get("FakeQuantize", 0)})
    return TechniqueResult(module, info, {"compile": module.compile_config}, standalone=True)


def quantization_aware(model: nn.Module, options: dict[str, Any], kwargs: dict[str, Any], context: Any,
                       info: dict[str, Any]) -> Any:
    """NNCF's quantization-aware training: int8 simulated on the torch model (calibrated as on the OpenVINO
    path), trained ``qat_steps`` steps with the test script's train(), then converted to OpenVINO, where the
    trained weights and ranges become int8. NNCF's accuracy control does not apply (the training is the
    recovery)."""
    import os

    import nncf

    if options["exclude"]:
        kwargs["ignored_scope"] = ignored_scope(options["exclude"])
    # NNCF compiles its fake-quantize C++ extension on first use (minutes on a small machine); its default
    # 60 s limit would fail the run half-way.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    context.progress("NNCF quantization-aware training: int8 simulated on the torch model (the first run compiles "
                     "NNCF's extension)")
    simulated = nncf.quantize(model, nncf.Dataset(list(context.calibration_inputs())), **kwargs)
    simulated = context.train_for(simulated, options["qat_steps"], "trains the int8-simulated model").eval()
    info["quantization_aware_training"] = {"steps": options["qat_steps"]}
    context.progress("converting the trained int8 model to OpenVINO")
    return convert(simulated, context.example_input)


def outputs_of(model: nn.Module, example: Any) -> dict[str, Any]:
    """``{"outputs": spec}`` when the original returns a Hugging Face ModelOutput (the OpenVINO module then
    returns the same type), else nothing."""
    spec = output_spec(model, example)
    return {"outputs": spec} if spec else {}


def compile_config(options: dict[str, Any], example: Any) -> dict[str, Any]:
    """OpenVINO compile settings from the options: the performance hint, and with ``static_shapes`` the example
    input's shapes (by keyword for dict inputs, else by position)."""
    config: dict[str, Any] = {"performance_hint": options["performance_hint"].upper()}
    if options["static_shapes"]:
        if isinstance(example, dict):
            config["static_shapes"] = {k: list(v.shape) for k, v in example.items() if isinstance(v, torch.Tensor)}
        else:
            items = example if isinstance(example, (tuple, list)) else (example,)
            config["static_shapes"] = [list(v.shape) for v in items]
    return config


def _within_budget(nncf: Any, ov_model: Any, quantized: Any, dataset: Any, kwargs: dict[str, Any], model: nn.Module,
                   context: Any, info: dict[str, Any]) -> Any:
    """Plain int8 when it keeps the user's metric within the budget; else NNCF's accuracy control (layers
    back to float until the drop fits), kept only where it measured better than plain int8."""
    sign = 1.0 if context.higher_is_better else -1.0
    budget = context.max_accuracy_drop
    baseline = context.evaluate(model)
    plain_drop = sign * (baseline - context.evaluate(OpenVINOModule(
        quantized, compile_config=outputs_of(model, context.example_input))))
    info["accuracy_control"] = {"max_drop": budget, "plain_int8_drop": round(plain_drop, 6)}
    if plain_drop <= budget:
        info["accuracy_control"]["used"] = "plain int8 (within the budget)"
        return quantized

    spec = output_spec(model, context.example_input)

    def validate(compiled_model: Any, _items: Any) -> float:
        return sign * context.evaluate(_CompiledModule(compiled_model, spec))

    context.progress("NNCF accuracy control: keeping layers in float until the drop fits")
    # (nncf.quantize takes the transformer rules as advanced_parameters; accuracy control names them
    # advanced_quantization_parameters)
    controlled_kwargs = {("advanced_quantization_parameters" if k == "advanced_parameters" else k): v
                         for k, v in kwargs.items()}
    controlled = nncf.quantize_with_accuracy_control(
        ov_model, dataset, nncf.Dataset([0]), validate, max_drop=budget, drop_type=nncf.DropType.ABSOLUTE,
        **controlled_kwargs)
    controlled_drop = sign * (baseline - context.evaluate(OpenVINOModule(
        controlled, compile_config=outputs_of(model, context.example_input))))
    info["accuracy_control"]["controlled_drop"] = round(controlled_drop, 6)
    better = controlled_drop < plain_drop
    info["accuracy_control"]["used"] = "accuracy control" if better else "plain int8 (accuracy control measured worse)"
    return controlled if better else quantized


class _CompiledModule(nn.Module):
    """Wrap an OpenVINO compiled model (as NNCF's validation_fn gets it) so the user's evaluate() runs it, with
    the original's output type (``spec``: :func:`output_spec`)."""

    def __init__(self, compiled: Any, spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.compiled = compiled
        self.spec = spec

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        return as_original_output(ov_call(self.compiled, args, kwargs), self.spec)

    def parameters(self, recurse: bool = True):  # evaluate() may ask for the device
        yield torch.zeros(0)


def quantized_layers(ov_model: Any) -> tuple[list[str], list[str]]:
    """(layers whose weights or inputs go through FakeQuantize, compute layers left in float)."""
    quantized, floating = [], []
    for op in ov_model.get_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        parents = [op.input_value(i).get_node() for i in range(op.get_input_size())]
        fed_by_fq = any(p.get_type_name() in ("FakeQuantize", "Convert", "Multiply", "Subtract") and
                        _has_fq_above(p) for p in parents)
        (quantized if fed_by_fq else floating).append(op.get_friendly_name())
    return quantized, floating


def _has_fq_above(node: Any, depth: int = 3) -> bool:
    if node.get_type_name() == "FakeQuantize":
        return True
    if depth == 0:
        return False
    return any(_has_fq_above(node.input_value(i).get_node(), depth - 1) for i in range(node.get_input_size()))
