"""NNCF weight compression (``nncf.compress_weights``) of the torch model: int8 or int4 weights, decompressed
on the fly by NNCF's decompressor hooks, embeddings included. NNCF's own ``get_config`` cannot serialize weight
decompressors, so the step records each hook (where it sits, its class among NNCF's four decompressors, the
shapes it was built with) and the packed weights' dtypes; ``rebuild`` replays them on a fresh architecture and
the core loads the saved tensors into it (no pickle)."""

from __future__ import annotations

from typing import Any

import torch
from model_opt.errors import TechniqueError
from model_opt.result import TechniqueResult
from torch import nn

from .openvino_module import serialize
from .scope import ignored_scope

DECOMPRESSORS = ("INT8AsymmetricWeightsDecompressor", "INT8SymmetricWeightsDecompressor",
                 "INT4AsymmetricWeightsDecompressor", "INT4SymmetricWeightsDecompressor")


def compress(model: nn.Module, options: dict[str, Any], context: Any) -> TechniqueResult:
    import nncf

    example = context.require_example_input()
    kwargs: dict[str, Any] = {"mode": getattr(nncf.CompressWeightsMode, options["mode"].upper())}
    if options["mode"].startswith("int4"):  # the rest (ratio < 1, and embeddings/head by NNCF's rule) is int8
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

        # a layer whose width is not a multiple of group_size takes the largest power-of-two group that divides it
        kwargs.update(group_size=options["group_size"], ratio=options["ratio"], all_layers=options["all_layers"],
                      advanced_parameters=AdvancedCompressionParameters(
                          group_size_fallback_mode=GroupSizeFallbackMode.ADJUST))
    if options["runtime"] == "openvino":
        if options["exclude"]:  # (the converted model is wrapped as "lm")
            kwargs["ignored_scope"] = ignored_scope(options["exclude"], "lm.", openvino=True)
        return compress_openvino(model, kwargs, example, context)
    if options["exclude"]:
        kwargs["ignored_scope"] = ignored_scope(options["exclude"])
    items = list(context.calibration_inputs()) if context.calibration_data is not None else [example]
    context.progress(f"NNCF weight compression ({options['mode']})")
    try:
        compressed = nncf.compress_weights(model, dataset=nncf.Dataset(items), **kwargs)
    except Exception as exc:
        raise TechniqueError(f"nncf.compress_weights failed ({' '.join(str(exc).split())[:200]})",
                             "exclude the layer it names, or try another mode; the input model is untouched"
                             ) from None
    hooks = hooks_of(compressed)
    if not hooks:
        raise TechniqueError("NNCF found no weight to compress (it compresses Linear, embedding and convolution "
                             "weights)", "use another technique for this model")
    packed = {name: {"dtype": str(p.dtype).removeprefix("torch."), "shape": list(p.shape)}
              for name, p in compressed.named_parameters() if not p.is_floating_point()}
    bits = {h["class"][:4].lower() for h in hooks}
    info = {"mode": options["mode"], "compressed_weights": len(hooks), "bit_widths": sorted(bits),
            "runtime_note": "weights are decompressed at every call: smaller in memory, not faster in eager "
                            "PyTorch"}
    return TechniqueResult(compressed, info, {"hooks": hooks, "packed": packed})


def compress_openvino(model: nn.Module, kwargs: dict[str, Any], example: Any, context: Any) -> TechniqueResult:
    """A causal LM converted to OpenVINO with its KV cache as inputs and outputs, its weights compressed there
    (OpenVINO's own int8/int4 kernels); decodes through :class:`OpenVINOCausalLM.generate`."""
    import nncf

    from .openvino_lm import OpenVINOCausalLM, convert_causal_lm

    ids = example.get("input_ids") if isinstance(example, dict) else example
    if not (isinstance(ids, torch.Tensor) and callable(getattr(model, "generate", None))):
        raise TechniqueError("runtime=openvino converts causal language models (a transformers model that "
                             "generates, with input_ids)", "use runtime=torch for this model")
    context.progress("converting the causal LM to OpenVINO with its KV cache as inputs and outputs")
    ov_model, layout = convert_causal_lm(model, ids)
    float_ir = serialize(ov_model)  # (before NNCF changes it): the float model in OpenVINO, for the report
    context.progress(f"NNCF weight compression on the OpenVINO model ({kwargs['mode'].value})")
    compressed = nncf.compress_weights(ov_model, **kwargs)
    module = OpenVINOCausalLM(compressed, compile_config={"kv": layout}).keep_float(float_ir)
    info = {"mode": kwargs["mode"].value, "runtime": "OpenVINO CPU", "kv_cache": layout,
            "compiled_with": module.describe_compile()}
    return TechniqueResult(module, info, {"compile": module.compile_config}, standalone=True)


def hooks_of(model: nn.Module) -> list[dict[str, Any]]:
    """Every NNCF decompressor hook of ``model``: where it sits and the arguments to build it again."""
    from nncf.torch.function_hook import get_hook_storage, is_wrapped

    if not is_wrapped(model):
        return []
    storage, found = get_hook_storage(model), []
    for kind in ("pre_hooks", "post_hooks"):
        for key, slots in getattr(storage, kind).items():
            for hook_id, module in slots.items():
                if type(module).__name__ not in DECOMPRESSORS:
                    raise TechniqueError(f"NNCF left a {type(module).__name__} hook that model-opt cannot save",
                                         "report it to model-opt with the model")
                found.append({"kind": kind, "key": key, "id": hook_id, "class": type(module).__name__,
                              "args": _arguments(module)})
    return found


def _arguments(module: nn.Module) -> dict[str, Any]:
    args: dict[str, Any] = {"scale": list(module._scale.shape)}
    if hasattr(module, "_zero_point"):  # int4 packs it: its unpacked shape is kept apart
        args["zero_point"] = list(getattr(module, "zero_point_shape", module._zero_point.shape))
    for name in ("compressed_weight_shape", "result_shape"):
        if hasattr(module, name):
            value = getattr(module, name)
            args[name] = list(value) if value is not None else None
    dtype = module.result_dtype
    args["result_dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else None
    return args


def rebuild(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """The recorded decompressor hooks and packed weight slots on a fresh architecture (values come from the
    artifact's tensors, loaded after this)."""
    from nncf.torch.function_hook import register_post_function_hook, register_pre_function_hook, wrap_model
    from nncf.torch.quantization import layers

    model = wrap_model(model)
    holders: dict[int, list[tuple[nn.Module, str]]] = {}  # a tied weight (GPT-2's embedding and head) stays tied
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        holders.setdefault(id(parameter), []).append((model.get_submodule(owner) if owner else model, attr))
    for name, spec in state["packed"].items():
        slot = nn.Parameter(torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"])), requires_grad=False)
        for module, attr in holders[id(model.get_parameter(name))]:
            setattr(module, attr, slot)
    register = {"pre_hooks": register_pre_function_hook, "post_hooks": register_post_function_hook}
    for hook in state["hooks"]:
        if hook["class"] not in DECOMPRESSORS or hook["kind"] not in register:
            raise ValueError(f"unknown NNCF hook {hook['class']!r} in the recipe")
        op_name, _, port = hook["key"].rpartition("__")
        register[hook["kind"]](model, op_name.replace(":", "."), int(port), _build(getattr(layers, hook["class"]),
                                                                                   hook["args"]))
    return model


def _build(kind: type, args: dict[str, Any]) -> nn.Module:
    kwargs: dict[str, Any] = {"scale": torch.zeros(args["scale"])}
    if "zero_point" in args:
        kwargs["zero_point"] = torch.zeros(args["zero_point"], dtype=torch.uint8)
    for name in ("compressed_weight_shape", "result_shape"):
        if name in args:
            kwargs[name] = tuple(args[name]) if args[name] is not None else None
    kwargs["result_dtype"] = getattr(torch, args["result_dtype"]) if args["result_dtype"] else None
    return kind(**kwargs)
