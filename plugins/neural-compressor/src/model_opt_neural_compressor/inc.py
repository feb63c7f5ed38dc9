"""Intel Neural Compressor 3.x flows: static int8 (export, prepare, calibrate, convert), weight-only, autotune."""

from __future__ import annotations

import atexit
import copy
import logging
import os
import shutil
import tempfile
from itertools import islice
from typing import Any

import torch
from model_opt.errors import AccuracyBudgetExceeded, TechniqueError, UsageError, describe
from model_opt.exported import ExportedModule
from model_opt.measure import call_model, export_program, split_input
from model_opt.modelinfo import run_checked
from model_opt.modules import excluded
from model_opt.result import TechniqueResult
from torch import nn

from . import smoothing

logging.getLogger("neural_compressor").setLevel(logging.WARNING)


def _workspace_outside_cwd() -> None:
    """INC makes its workspace, ``./nc_workspace/<time>/``, in the user's working directory the first time an
    algorithm asks for it (RTN does): point it at a temporary folder of this process, removed at exit."""
    from neural_compressor.common import options

    workspace = tempfile.mkdtemp(prefix="model-opt-inc-")
    atexit.register(shutil.rmtree, workspace, True)
    options.workspace = workspace + os.sep


_workspace_outside_cwd()


def export_for_quantization(model: nn.Module, example: Any) -> Any:
    """The graph INC's pt2e flow quantizes: torch.export (non-strict, dynamic batch where the model allows),
    decomposed to core ATen ops first, which the X86 inductor quantizer's patterns need on transformers
    (without it, annotating Hugging Face BERT attention fails with an IndexError); inputs of any form."""
    try:
        program = export_program(model.eval(), example, strict=False).run_decompositions({})
    except Exception as exc:
        raise TechniqueError(f"INC could not export the model with torch.export ({describe(exc, 160)})",
                             "check that torch.export.export works for this model; nncf int8_static (OpenVINO) "
                             "converts more models") from None
    graph = program.module()
    graph._exported = True  # what INC's own export marks, so that prepare() takes the pt2e path
    graph.dynamic_shapes = None
    return graph


def _static(model: nn.Module, example: Any, batches: list[Any], options: dict[str, Any]) -> tuple[nn.Module, dict]:
    """Export, smooth (SmoothQuant, unless off), calibrate and convert; every module named in ``exclude`` (and
    whatever is inside it) stays float: INC passes its local float config to the X86 inductor quantizer as "no
    config" for that module name, which the quantizer matches against each node's module path, ancestors
    included. Returns the graph and what smoothing did."""
    from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare

    config = StaticQuantConfig(act_sym=options["act_sym"])
    for name in options["exclude"]:
        config.set_local(name, StaticQuantConfig(w_dtype="fp32", act_dtype="fp32"))
    graph = export_for_quantization(model, example)
    alpha = options["smooth_quant_alpha"]
    smoothed = {} if alpha < 0 else smoothing.smooth(graph, batches, alpha or None, options["exclude"],
                                                       options["act_sym"], options["reduce_range"] == "on")
    prepared = prepare(graph, config)
    if options["reduce_range"] == "on":
        _seven_bit_activations(prepared)
    with torch.no_grad():
        for batch in batches:
            call_model(prepared, batch)
    return convert(prepared), smoothed


def reduce_range(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``reduce_range`` resolved: ``auto`` is on where this CPU has no int8 dot products."""
    if options["reduce_range"] != "auto":
        return options
    from model_opt.device import device_profile

    return {**options, "reduce_range": "off" if device_profile().has("int8 dot products") else "on"}


def _activations(options: dict[str, Any]) -> str:
    return ("7-bit (reduce_range: int8 kernels without int8 dot products saturate 8-bit ones)"
            if options["reduce_range"] == "on" else "8-bit")


def _seven_bit_activations(prepared: nn.Module) -> None:
    """Halve the range of every activation observer (uint8 0-127, int8 -64-63), as torchao's X86 quantizer's
    ``reduce_range`` does for CPUs without VNNI: there oneDNN multiplies uint8 activations by int8 weights with
    an instruction that adds two products in 16 bits, which saturate for 8-bit activations (the compiled result
    then drifts from what calibration simulated)."""
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not node.args or getattr(node.args[0], "op", None) == "get_attr":
            continue  # an observer of a weight keeps its range
        module = prepared.get_submodule(node.target)
        dtype = getattr(module, "dtype", None)
        if hasattr(module, "quant_max") and dtype in (torch.uint8, torch.int8):
            module.quant_min, module.quant_max = (0, 127) if dtype == torch.uint8 else (-64, 63)


def _describe_smoothing(alpha: float, smoothed: dict[str, Any]) -> str:
    if alpha < 0:
        return "off"
    how = "alpha chosen per input" if alpha == 0 else f"alpha {alpha:g}"
    return f"{smoothed['smoothed']} Linear layers smoothed, {smoothed['unchanged']} left as they were ({how})"


def _quantized_ops(graph_module: nn.Module) -> int:
    return sum(1 for node in graph_module.graph.nodes if "quantize_per" in str(node.target)
               and "dequantize" not in str(node.target))


def static_int8(model: nn.Module, options: dict[str, Any], context: Any) -> tuple[nn.Module, dict]:
    example = context.require_example_input()
    batches = list(islice(context.calibration_inputs(), options["calibration_batches"]))
    if not batches:
        raise TechniqueError("calibration_data(dataset_path) yielded nothing", "make it yield model inputs")
    run_checked(model, batches[0], what="calibration data")
    context.progress(f"INC static int8: export, {'' if options['smooth_quant_alpha'] < 0 else 'smooth, '}"
                     f"calibrate on {len(batches)} batches, convert")
    options = reduce_range(options)
    quantized, smoothed = _static(model, example, batches, options)
    return TechniqueResult(ExportedModule(quantized, example), {
        "calibration_batches": len(batches), "quantize_ops": _quantized_ops(quantized),
        "smooth_quant": _describe_smoothing(options["smooth_quant_alpha"], smoothed),
        "activations": _activations(options),
        **({"kept_float": options["exclude"]} if options["exclude"] else {}),
        "runtime_note": "run it under torch.compile with freezing for int8 kernels (--compile)"}, {"graph": "export"},
        standalone=True)


def weight_only(model: nn.Module, options: dict[str, Any], context: Any) -> tuple[nn.Module, dict]:
    from neural_compressor.torch.quantization import AWQConfig, GPTQConfig, RTNConfig, convert, prepare

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TechniqueError("the model has no Linear layer for weight-only quantization",
                             "weight-only quantization packs Linear weights; use int8_static for CNNs")
    common = {"bits": options["bits"], "group_size": options["group_size"], "use_sym": options["use_sym"]}
    exclude = options["exclude"]
    if options["algorithm"] in ("gptq", "awq"):
        batches = list(islice(context.calibration_inputs(f"{context.technique} {options['algorithm']}"), 8))
        if options["algorithm"] == "gptq":
            # INC resolves GPTQ's model_path (else the model's name_or_path) even when it does not read layers
            # from it, and looks a name that is not a folder up on the Hub: "" for a model built from a config.
            # Any existing folder keeps it local; with use_layer_wise=False nothing is read from it.
            prepared = prepare(model, _keep_float(GPTQConfig(**common, use_layer_wise=False,
                                                             model_path=tempfile.gettempdir()), linears, exclude))
        else:  # AWQ traces the model on one input tensor to find where its scales can be absorbed
            if not any(type(m) is nn.ModuleList for m in model.modules()):
                raise TechniqueError("algorithm=awq works block by block, and INC finds the blocks as the model's "
                                     "first nn.ModuleList (as in Hugging Face transformers); this model has none",
                                     "use algorithm=gptq or rtn for this model")
            example = context.require_example_input()
            ids = example.get("input_ids") if isinstance(example, dict) else example
            if not isinstance(ids, torch.Tensor):
                what = "a dict without input_ids" if isinstance(example, dict) else f"a {type(example).__name__}"
                raise TechniqueError(f"algorithm=awq traces the model on one input tensor, and the example input is "
                                     f"{what}", "use algorithm=gptq or rtn for this model")
            prepared = prepare(model, _keep_float(AWQConfig(**common, use_layer_wise=False), linears, exclude),
                               example_inputs=ids)
        with torch.no_grad():
            for batch in batches:
                call_model(prepared, batch)
        quantized = convert(prepared)
    else:
        quantized = convert(prepare(model, _keep_float(RTNConfig(**common, use_layer_wise=False), linears, exclude)))
    packed = _packed(quantized)
    # AWQ multiplies the input of a layer whose scale no earlier layer absorbs (INC's MulLinear around the
    # packed layer): the replay wraps the same layers before packing them.
    input_scaled = [n for n, m in quantized.named_modules() if type(m).__name__ == "MulLinear"]
    return TechniqueResult(quantized, {"algorithm": options["algorithm"], "bits": options["bits"],
                                       "group_size": options["group_size"], "packed_layers": len(packed),
                                       "input_scaled_layers": len(input_scaled)},
                           {"graph": "weight_only", "bits": options["bits"], "group_size": options["group_size"],
                            "use_sym": options["use_sym"], "packed": packed, "input_scaled": input_scaled})


def _keep_float(config: Any, linears: list[str], exclude: list[str]) -> Any:
    """``config`` with every Linear named by ``exclude`` (or inside a module it names) kept in float."""
    for name in linears:
        if excluded(name, exclude):
            config.set_local(name, type(config)(dtype="fp32"))
    return config


def _packed(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ in ("INCWeightOnlyLinear", "WeightOnlyLinear")]


def register_int8_kernels() -> None:
    """Let torch.compile turn an int8 graph's quantize/dequantize pairs around each Linear and conv into oneDNN
    int8 kernels (weights packed at freezing). Those inductor passes are registered when torchao's X86 quantizer
    module is imported, which quantizing does but reopening a saved program does not: without it a reopened
    result compiles to float matmuls between quantize and dequantize steps, slower than the float model."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401


def restore(model: nn.Module, method: str, options: dict[str, Any], state: dict[str, Any]) -> nn.Module:
    """The structure of a saved INC result on a fresh architecture, ready for the saved weights."""
    if state.get("graph") == "export":
        register_int8_kernels()
        return ExportedModule()
    if state.get("graph") == "weight_only":
        return _restore_weight_only(model, state)
    raise UsageError(f"neural-compressor {method}: the saved state names no known graph ({state.get('graph')!r})",
                     "re-create the file with model-opt optimize")


def _restore_weight_only(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """RTN packing (same bits, group size, symmetry) of the layers the result packed, after wrapping the layers
    AWQ gave an input scale; the saved weights then fill in the packed values, scales and input scales."""
    from neural_compressor.torch.algorithms.weight_only.modules import MulLinear
    from neural_compressor.torch.quantization import RTNConfig, convert, prepare

    for name in state.get("input_scaled", []):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, MulLinear(model.get_submodule(name)))
    config = RTNConfig(bits=state["bits"], group_size=state["group_size"], use_sym=state["use_sym"],
                       use_layer_wise=False)
    if "packed" in state:  # the same layers as the result, whatever INC's defaults for RTN are
        for name, layer in model.named_modules():
            if isinstance(layer, nn.Linear) and name not in state["packed"]:
                config.set_local(name, RTNConfig(dtype="fp32"))
    return convert(prepare(model, config))


def tune(model: nn.Module, options: dict[str, Any], context: Any) -> tuple[nn.Module, dict]:
    """INC autotune over a config set, with the user's metric as eval_fn and the drop budget."""
    from neural_compressor.torch.quantization import (
        RTNConfig,
        StaticQuantConfig,
        TuningConfig,
        autotune,
        get_woq_tuning_config,
    )

    if context.evaluate is None or context.max_accuracy_drop is None:
        raise UsageError("neural-compressor autotune needs your metric and a budget",
                         "run it through model-opt optimize with --max-accuracy-drop")
    example = context.require_example_input()
    baseline = context.evaluate(model)
    if baseline == 0:
        raise UsageError("autotune needs a non-zero baseline metric", "check the test script")
    sign = 1.0 if context.higher_is_better else -1.0
    trials: list[dict[str, Any]] = []

    def eval_fn(candidate: nn.Module) -> float:
        """INC compares relative losses of a positive score: 1.0 at the baseline, lower when worse."""
        value = context.evaluate(candidate)
        trials.append({"trial": len(trials), "metric": value})
        context.progress(f"autotune trial {len(trials)}: metric {value:.4f}")
        return 1.0 - sign * (baseline - value) / abs(baseline)

    if options["space"] == "static":
        batches = list(islice(context.calibration_inputs(),
                              options["calibration_batches"]))
        config_set = [StaticQuantConfig(act_sym=False), StaticQuantConfig(act_sym=True),
                      StaticQuantConfig(w_granularity="per_tensor")]
        target = export_for_quantization(model, example)
        options = reduce_range(options)

        def run_fn(prepared: nn.Module) -> None:
            if options["reduce_range"] == "on":  # (each trial's observers, before they see a batch)
                _seven_bit_activations(prepared)
            with torch.no_grad():
                for batch in batches:
                    call_model(prepared, batch)
    else:
        config_set = [RTNConfig(use_layer_wise=False), RTNConfig(use_sym=False, group_size=32, use_layer_wise=False),
                      *[c for c in get_woq_tuning_config() if type(c).__name__ == "RTNConfig"]]
        target, run_fn = copy.deepcopy(model), None
    relative = context.max_accuracy_drop / abs(baseline)
    tuning = TuningConfig(config_set=config_set, tolerable_loss=relative, max_trials=options["max_trials"])
    best = autotune(target, tuning, eval_fn=eval_fn, run_fn=run_fn, example_inputs=split_input(example)[0])
    info = {"space": options["space"], "baseline": baseline, "tolerable_loss_relative": relative,
            "trials": trials, **({"activations": _activations(options)} if options["space"] == "static" else {})}
    result = None
    if best is not None:
        result = ExportedModule(best, example) if options["space"] == "static" else best
        final = context.evaluate(result)  # INC's verdict, checked with the user's own metric
        if sign * (baseline - final) > context.max_accuracy_drop + 1e-12:
            result = None
    if result is None:
        tried = trials[1:] or trials
        best_tried = max(tried, key=lambda t: sign * t["metric"]) if tried else None
        raise AccuracyBudgetExceeded(
            f"autotune found no config within the allowed drop of {context.max_accuracy_drop:g} "
            f"(baseline {baseline:.4f}, best tried {best_tried['metric']:.4f})" if best_tried else
            "autotune found no config within the allowed drop", "allow a larger drop or another space")
    # INC does not expose the weight-only config it chose, so that result cannot be replayed: it is saved
    # pickled and reopens with trust_model=True. The static result is a torch.export program.
    static = options["space"] == "static"
    return TechniqueResult(result, info, {"graph": "export"} if static else None, standalone=static)
