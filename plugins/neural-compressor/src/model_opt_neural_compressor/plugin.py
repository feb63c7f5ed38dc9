"""Hook implementations of the neural-compressor plugin (Intel Neural Compressor 3.x, PyTorch flavour)."""

from __future__ import annotations

from typing import Any

from model_opt.hookspecs import hookimpl
from model_opt.registry import Option, Recommended, Technique

REQUIRES = ("neural_compressor",)
REDUCE_RANGE = Option("reduce_range", str, "auto", "7-bit activations: without int8 dot products (AVX2 only) oneDNN's "
                      "int8 kernels add pairs of 8-bit products in 16 bits, which saturate; auto: on where this CPU "
                      "lacks int8 dot products", choices=("auto", "on", "off"))

TECHNIQUES = (
    Technique(
        kind="quantize", backend="neural-compressor", method="int8_static",
        summary="INC static int8 through its export flow (X86 inductor quantizer), calibrated on your data.",
        options=(Option("calibration_batches", int, 10, "calibration batches to run", minimum=1),
                 Option("act_sym", bool, False, "symmetric activations (default asymmetric uint8)"),
                 Option("exclude", list, [], "module names (or prefixes) to keep in float"),
                 Option("smooth_quant_alpha", float, 0.0, "SmoothQuant before quantizing (each Linear's input "
                        "divided per channel, its weight multiplied): 0 chooses, for each input, the alpha (or "
                        "none) whose int8 outputs are closest on the calibration data; a value in (0, 1] fixes "
                        "it; -1 (any negative value) turns it off", minimum=-1, maximum=1),
                 REDUCE_RANGE),
        needs=("example_input", "calibration_data"), requires=REQUIRES, speeds_up=(), speeds_up_compiled=("cpu",),
        search_space={}, families=("cnn", "vit", "hybrid", "transformer"),
        recommended=(Recommended("transformer", "int8 Linear layers after SmoothQuant, run by oneDNN's int8 kernels "
                                                "under torch.compile (also on CPUs without int8 dot products, where "
                                                "their int8 kernels outrun float)", rank=8),),
        fast_needs_for={family: {"int8 kernels": "its graph runs oneDNN's int8 linear"}
                        for family in ("transformer", "vit")},
        speed_note="INC int8 graphs are fast only under torch.compile with freezing (--compile)",
    ),
    Technique(
        kind="quantize", backend="neural-compressor", method="weight_only",
        summary="INC weight-only quantization of Linear layers: RTN, or GPTQ/AWQ calibrated on your data.",
        options=(Option("bits", int, 4, "weight bits", choices=(4, 8)),
                 Option("group_size", int, 32, "weights per scale (-1: per channel)", minimum=-1),
                 Option("algorithm", str, "rtn", "rtn (round to nearest), gptq (needs calibration data) or awq "
                        "(activation-aware scales, needs calibration data)", choices=("rtn", "gptq", "awq")),
                 Option("use_sym", bool, True, "symmetric weights"),
                 Option("exclude", list, [], "module names (or prefixes) whose Linear layers stay in float")),
        requires=REQUIRES, speeds_up=(),
        recommended=(Recommended("causal-lm", "4-bit weights (RTN, or GPTQ/AWQ calibrated on your text) cut the "
                                              "model to about an eighth of float32 on disk and in memory", rank=15),),
        speed_note="weight-only packing saves memory and size; on CPU it runs dequantize + float matmul, which is "
                   "not faster",
    ),
    Technique(
        kind="quantize", backend="neural-compressor", method="autotune",
        summary="INC accuracy-aware tuning over quantization configs, driven by your metric and "
                "--max-accuracy-drop.",
        options=(Option("space", str, "static", "configs to try: static int8 variants, or weight-only ones",
                        choices=("static", "weight_only")),
                 Option("max_trials", int, 8, "tuning trials at most", minimum=1),
                 Option("calibration_batches", int, 10, "calibration batches per static trial", minimum=1),
                 REDUCE_RANGE),
        needs=("example_input",), requires=REQUIRES, speeds_up=(), speeds_up_compiled=("cpu",),
        speed_note="the tuned int8 graph is fast only under torch.compile with freezing (--compile)",
    ),
)


@hookimpl
def register_techniques(register: Any) -> None:
    for technique in TECHNIQUES:
        register(technique)


@hookimpl
def quantize(model: Any, technique: Technique, options: dict[str, Any], context: Any) -> Any:
    from . import inc

    return {"int8_static": inc.static_int8, "weight_only": inc.weight_only, "autotune": inc.tune}[
        technique.method](model, options, context)


@hookimpl
def restore(model: Any, technique: Technique, options: dict[str, Any], state: dict[str, Any], context: Any) -> Any:
    """Static int8 is a torch.export program saved as the weights; weight-only packing is redone with RTN on
    the fresh architecture (same layers, bits, group size and symmetry, AWQ's input multipliers put back), and
    the packed weights are then loaded."""
    from . import inc

    return inc.restore(model, technique.method, options, state)
