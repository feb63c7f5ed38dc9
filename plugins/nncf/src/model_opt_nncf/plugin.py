"""Hook implementations of the nncf plugin: calibrated int8 deployed through OpenVINO, weight compression of
the torch model, and NNCF pruning."""

from __future__ import annotations

from typing import Any

from model_opt.hookspecs import hookimpl
from model_opt.registry import Option, Recommended, Technique

INT8_STATIC = Technique(
    kind="quantize",
    backend="nncf",
    method="int8_static",
    summary="NNCF post-training int8, calibrated on your data, deployed and measured as an OpenVINO model.",
    options=(
        Option("subset_size", int, 300, "calibration samples NNCF uses", minimum=1),
        Option("preset", str, "performance", "symmetric (performance) or asymmetric activations (mixed)",
               choices=("performance", "mixed")),
        Option("model_type", str, "auto", "transformer enables NNCF's transformer rules (auto: for models with "
               "attention)",
               choices=("auto", "transformer")),
        Option("smooth_quant_alpha", float, 0.95, "with the transformer rules, SmoothQuant first: how much of the "
               "activations' range moves into the MatMul weights (0-1; -1 turns it off)", minimum=-1.0,
               maximum=1.0),
        Option("fast_bias_correction", bool, True, "fast bias correction (else the slower, more accurate one)"),
        Option("exclude", list, [], "module names (or prefixes) to keep in float", aliases=("ignored",)),
        Option("accuracy_control", bool, True, "with --max-accuracy-drop, keep layers in float until the "
               "metric is within the budget (nncf.quantize_with_accuracy_control)"),
        Option("static_shapes", bool, False, "also compile OpenVINO for the example input's exact shapes, used "
               "for calls with those shapes (others run the dynamic-shape compilation)"),
        Option("performance_hint", str, "latency", "OpenVINO's PERFORMANCE_HINT when compiling",
               choices=("latency", "throughput")),
        Option("qat_steps", int, 0, flag="--qat-steps", help="quantization-aware training: steps of your "
               "train() on the int8-simulated torch model before it becomes OpenVINO int8 (0: post-training only)",
               minimum=0),
    ),
    needs=("example_input", "calibration_data"),
    requires=("nncf", "openvino"),
    search_space={},
    default=True,
    families=("cnn", "vit", "hybrid", "transformer", "causal-lm"),
    recommended=(Recommended("cnn", "int8 for CNNs is fast on CPU through OpenVINO", rank=10),
                 Recommended("transformer", "int8 through OpenVINO with NNCF's transformer rules (attention kept "
                             "accurate)", rank=10),
                 Recommended("vit", "int8 through OpenVINO with NNCF's transformer rules", rank=5),
                 Recommended("hybrid", "int8 through OpenVINO for the convolutions and the attention", rank=5)),
    speeds_up=("cpu",),
    speed_note="the OpenVINO runtime runs on the CPU here",
    fast_needs_for={family: {"int8 kernels": "OpenVINO runs its int8 Linear layers on int8 kernels"}
                    for family in ("transformer", "vit", "causal-lm")},
)


WEIGHT_ONLY = Technique(
    kind="quantize",
    backend="nncf",
    method="weight_only",
    summary="NNCF weight compression (nncf.compress_weights) of the torch model: int8 or int4 weights, "
            "embeddings included, decompressed on the fly.",
    options=(
        Option("mode", str, "int8_asym",
               "weight format (int4 modes keep the embeddings and head in int8 unless all_layers)",
               choices=("int8_asym", "int8_sym", "int4_sym", "int4_asym")),
        Option("group_size", int, 128, "int4: weights per scale (-1: per channel; a layer it does not divide gets "
               "the largest power of two that does)", minimum=-1),
        Option("ratio", float, 1.0, "int4: share of the layers in int4 (the rest int8)", minimum=0.0,
               maximum=1.0),
        Option("all_layers", bool, False, "int4: the embeddings and the last layer in int4 too (NNCF keeps them "
               "in int8 by default: they matter most to accuracy)"),
        Option("exclude", list, [], "module names (or prefixes) to keep in float (runtime=torch)"),
        Option("runtime", str, "torch", "torch: the torch model with NNCF's decompression hooks; openvino: a causal "
               "LM converted to OpenVINO with its KV cache as inputs/outputs, compressed there",
               choices=("torch", "openvino")),
    ),
    needs=("example_input",),
    requires=("nncf",),
    families=("causal-lm", "transformer", "vit", "diffusion"),
    recommended=(Recommended("causal-lm", "on CPU: int4 weights decoded by OpenVINO's own kernels with its KV cache "
                             "kept inside the runtime; decode reads every weight once per token, and int4 reads an "
                             "eighth of float32's bytes (the result is an OpenVINO model)",
                             {"mode": "int4_sym", "runtime": "openvino"}, rank=3),
                 Recommended("causal-lm", "the smallest torch weights (int8 or int4, embeddings too); decompressed "
                             "at every call, so smaller rather than faster in eager PyTorch", {"mode": "int8_asym"},
                             rank=20)),
    speeds_up=(),
    speeds_up_with={"runtime": {"openvino": ("cpu",)}},
    speed_note="with runtime=torch the weights are decompressed at every call: it shrinks the model's memory, not "
               "its latency (runtime=openvino runs OpenVINO's int8/int4 kernels, for causal LMs)",
)


_PRUNE_COMMON = (
    Option("amount", float, 0.5, flag="--prune-amount", help="fraction of weights to zero", minimum=0.0,
           maximum=1.0, exclusive_minimum=True, exclusive_maximum=True),
    Option("exclude", list, [], "module names (or prefixes) to leave unpruned"),
    Option("bn_adaptation", bool, True, "re-estimate BatchNorm statistics on calibration data after pruning "
           "(nncf.batch_norm_adaptation)"),
    Option("bn_batches", int, 20, "calibration batches for batch-norm adaptation", minimum=1),
)
_SPARSE_NOTE = ("unstructured sparsity keeps dense shapes, so dense PyTorch is not faster; use structured pruning "
                "(--prune-backend torch-pruning) to remove whole channels")
PRUNE_MAGNITUDE = Technique(
    kind="prune",
    backend="nncf",
    method="unstructured",
    summary="NNCF magnitude pruning (nncf.prune): zero the smallest weights per layer or across layers.",
    options=(Option("scope", str, "layer", "rank weights per layer (local) or across all layers (global)",
                    choices=("layer", "global")), *_PRUNE_COMMON),
    needs=("example_input",),
    requires=("nncf",),
    speeds_up=(),
    speed_note=_SPARSE_NOTE,
    families=("cnn", "vit", "hybrid", "transformer"),
)
PRUNE_REGULARIZATION = Technique(
    kind="prune",
    backend="nncf",
    method="regularization",
    summary="NNCF regularization-based pruning: masks trained with your train() hook towards the target amount.",
    options=(*_PRUNE_COMMON,
             Option("train_steps", int, 200, "steps of your train(model, dataset_path, steps) that train the masks",
                    minimum=1),
             Option("p", float, 0.05, "scale of NNCF's RBLoss (smaller pushes harder to the target)", minimum=0.0,
                    exclusive_minimum=True),
             Option("mask_lr", float, 0.05, "learning rate of the masks' own Adam", minimum=0.0,
                    exclusive_minimum=True)),
    needs=("example_input", "train"),
    requires=("nncf",),
    speeds_up=(),
    speed_note=_SPARSE_NOTE,
)


@hookimpl
def register_techniques(register: Any) -> None:
    register(INT8_STATIC)
    register(WEIGHT_ONLY)
    register(PRUNE_MAGNITUDE)
    register(PRUNE_REGULARIZATION)


@hookimpl
def prune(model: Any, technique: Technique, options: dict[str, Any], context: Any) -> Any:
    from .prune import prune_unstructured

    return prune_unstructured(model, technique.method, options, context)


@hookimpl
def quantize(model: Any, technique: Technique, options: dict[str, Any], context: Any) -> Any:
    from model_opt.errors import DeviceError

    from .quantize import quantize_int8

    if technique.method == "weight_only":
        from .weights import compress

        return compress(model, options, context)
    if context.device.startswith("cuda"):
        raise DeviceError("nncf int8_static deploys to the OpenVINO CPU runtime", "use --device cpu")
    return quantize_int8(model, options, context)


@hookimpl
def restore(model: Any, technique: Technique, options: dict[str, Any], state: dict[str, Any], context: Any) -> Any:
    """Pruning keeps the architecture (the zeros are in the weights). The quantized model is OpenVINO IR,
    saved as the artifact's weights: an empty module takes it."""
    if technique.kind == "prune":
        return model
    if "kv" in (state.get("compile") or {}):  # a causal LM in OpenVINO with its KV cache: the IR is the weights
        from .openvino_lm import OpenVINOCausalLM

        return OpenVINOCausalLM(compile_config=state["compile"])
    if technique.method == "weight_only":
        from .weights import rebuild

        return rebuild(model, state)
    from .openvino_module import OpenVINOModule

    return OpenVINOModule(compile_config=state.get("compile"))


@hookimpl
def load_model(path: Any) -> Any:
    """Reopen OpenVINO IR (``.xml`` with its ``.bin``) written beside a model-opt artifact."""
    if str(path).endswith(".xml"):
        from .openvino_module import OpenVINOModule

        return OpenVINOModule.from_ir(path)
    return None
