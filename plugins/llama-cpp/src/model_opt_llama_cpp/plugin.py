"""Hook implementations of the llama-cpp plugin: a causal LM as GGUF, quantized by llama.cpp and run in it."""

from __future__ import annotations

from typing import Any

from model_opt.hookspecs import hookimpl
from model_opt.registry import Option, Recommended, Technique

#: The types offered (llama.cpp's ``LLAMA_FTYPE_*`` names, lower case); those the installed llama.cpp lacks are
#: refused when asked for.
TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k")

GGUF = Technique(
    kind="quantize",
    backend="llama-cpp",
    method="gguf",
    summary="A causal LM (Llama or GPT-2 architecture) as a GGUF file for llama.cpp or Ollama, quantized by "
            "llama.cpp's own quantizer and measured running in llama.cpp.",
    options=(Option("type", str, "q4_0", "GGUF type: f32/f16/bf16 float, q8_0 (8-bit), q4_0, q4_k_m... (smaller "
                    "and faster to decode, less accurate)", choices=TYPES),
             Option("imatrix", str, "auto", "an importance matrix from the calibration text (each input channel's "
                    "mean square, as llama.cpp's llama-imatrix makes it) that llama.cpp's quantizer weights rounding "
                    "errors by; auto: for the 4-bit types, when there is calibration text",
                    choices=("auto", "on", "off"))),
    requires=("llama_cpp", "gguf"),
    families=("causal-lm",),
    recommended=(Recommended("causal-lm", "on CPU: llama.cpp's own kernels decode a GGUF file; q4_k_m (Ollama's "
                             "default) keeps most weights in 4-bit blocks and the most sensitive in 6-bit: about a "
                             "sixth of float32's bytes read per token, closer to float than q4_0 (the result is a "
                             ".gguf that llama.cpp and Ollama run as it is)", {"type": "q4_k_m"}, rank=1),
                 Recommended("causal-lm", "plain 4-bit GGUF in llama.cpp: as small as q4_k_m, a little less "
                             "accurate; on some CPUs the faster of the two (autotune measures both)", {"type": "q4_0"},
                             rank=2),
                 Recommended("causal-lm", "8-bit GGUF in llama.cpp: closest to the float model's accuracy",
                             {"type": "q8_0"}, rank=3)),
    speeds_up=("cpu",),
    speed_note="runs in llama.cpp, not torch: the report splits the speed-up into llama.cpp's own (the float32 GGUF) "
               "and the quantization's",
    search_space={"type": ("q8_0", "q4_k_m", "q4_0")},
    exports={"gguf": {"type": "f16"}},
)


@hookimpl
def register_techniques(register: Any) -> None:
    register(GGUF)


@hookimpl
def quantize(model: Any, technique: Technique, options: dict[str, Any], context: Any) -> Any:
    from .quantize import quantize_gguf

    return quantize_gguf(model, options, context)


@hookimpl
def restore(model: Any, technique: Technique, options: dict[str, Any], state: dict[str, Any], context: Any) -> Any:
    """The GGUF file is the whole model (the artifact's weights): an empty module takes it."""
    from .gguf_module import GGUFModule

    return GGUFModule()


@hookimpl
def load_model(path: Any) -> Any:
    """Open a ``.gguf`` file as it is (GGUF holds no code)."""
    if str(path).endswith(".gguf"):
        from .gguf_module import GGUFModule

        return GGUFModule(path)
    return None
