"""Hook implementations of the torchao plugin: int8 weight-only, int8 dynamic, int4/float8 (CUDA), autoquant."""

from __future__ import annotations

from typing import Any

from model_opt.hookspecs import hookimpl
from model_opt.registry import Option, Recommended, Technique

COMMON = (
    Option("skip_head", bool, True, "leave the classifier head in float"),
    Option("min_features", int, 0, "skip Linear layers with min(in, out) below this", minimum=0),
    Option("exclude", list, [], "module names (or prefixes) to leave in float"),
)
CPU_NOTE = ("torchao int8 runs slower than float in eager mode on CPU; under torch.compile with freezing it is "
            "faster on CPUs with VNNI/AMX int8 instructions (--compile)")


def _technique(method: str, summary: str, *, options: tuple = (), compiled: tuple = ("cpu", "cuda"),
               note: str = CPU_NOTE, search: dict | None = None, **fields: Any) -> Technique:
    """A torchao quantization technique; ``fields`` are other :class:`Technique` fields (needs, speeds_up,
    recommended)."""
    fields.setdefault("speeds_up", ("cuda",))
    return Technique(kind="quantize", backend="torchao", method=method, summary=summary, options=COMMON + options,
                     requires=("torchao",), speeds_up_compiled=compiled, speed_note=note, search_space=search,
                     families=("vit", "hybrid", "transformer", "diffusion", "causal-lm"), **fields)


#: int8 matmuls: faster than float only where the CPU has int8 dot products (measured: benchmarks/RESULTS.md)
INT8_FAST = {"int8 dot products": "without them int8 matmuls run slower than float, even compiled"}

QAT = Option("qat_steps", int, 0, flag="--qat-steps", help="quantization-aware training: steps of your train() "
             "with int8 simulated (torchao QATConfig) before the weights are quantized (0: post-training only)",
             minimum=0)

TECHNIQUES = (
    _technique("int8_weight_only", "int8 weights, float activations (torchao Int8WeightOnlyConfig).", search={},
               options=(QAT,), fast_needs=INT8_FAST,
               recommended=(Recommended("causal-lm", "decode reads every weight once per token, so it is bound by "
                                        "memory: int8 weights read a quarter of the float32 bytes (run the decode "
                                        "compiled: --compile)", {"skip_head": False}, rank=5),
                            Recommended("vit", "int8 weights halve the memory traffic of Linear-heavy blocks (fast "
                                        "under --compile on CPU)", rank=10),
                            Recommended("diffusion", "int8 weights shrink the UNet", rank=10))),
    _technique("int8_dynamic", "int8 weights and dynamically quantized int8 activations "
               "(torchao Int8DynamicActivationInt8WeightConfig).", search={}, options=(QAT,), fast_needs=INT8_FAST,
               recommended=(Recommended("hybrid", "int8 activations and weights for the Linear layers", rank=10),
                            Recommended("transformer", "int8 GEMMs for Linear-heavy models (fast under --compile on "
                                        "CPUs with VNNI/AMX)", rank=20))),
    _technique("int4_weight_only", "int4 grouped weights for bf16 models on CUDA (torchao Int4WeightOnlyConfig).",
               options=(Option("group_size", int, 128, "weights per scale", choices=(32, 64, 128, 256)),),
               needs=("cuda",), compiled=("cuda",), note="runs only on CUDA"),
    _technique("float8_dynamic", "float8 weights and activations on CUDA compute capability 8.9+ "
               "(torchao Float8DynamicActivationFloat8WeightConfig).", needs=("cuda",), compiled=("cuda",),
               note="runs only on CUDA GPUs of compute capability 8.9 or newer",
               fast_needs={"cuda 8.9": "float8 matmuls need its float8 tensor cores"}),
    _technique("autoquant", "Per layer shape, time float, int8 weight-only, int8 dynamic (and the CUDA kernels "
               "where available) under the runtime you will use, and keep the fastest within a tolerance.",
               options=(Option("tolerance", float, 0.05, "largest relative output error accepted per layer",
                               minimum=0.0),
                        Option("candidates", list, [], "methods to consider (default: all this device runs)")),
               needs=("example_input",), speeds_up=("cpu", "cuda"), compiled=("cpu", "cuda"),
               note="each layer keeps float where no quantized kernel was measured faster"),
)


@hookimpl
def register_techniques(register: Any) -> None:
    for technique in TECHNIQUES:
        register(technique)


@hookimpl
def quantize(model: Any, technique: Technique, options: dict[str, Any], context: Any) -> Any:
    from .quantize import autoquant, quantize_method

    if technique.method == "autoquant":
        return autoquant(model, options, context)
    return quantize_method(model, technique.method, options, context)


@hookimpl
def restore(model: Any, technique: Technique, options: dict[str, Any], state: dict[str, Any], context: Any) -> Any:
    """torchao's quantized weights are tensor subclasses that torchao registers as safe globals for
    ``torch.load(weights_only=True)``; ``load_state_dict(assign=True)`` puts them into the float layers.
    Importing torchao registers them; the architecture itself is the original one."""
    import torchao  # noqa: F401

    return model
