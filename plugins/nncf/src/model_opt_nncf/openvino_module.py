"""Run an OpenVINO model as a torch module, so that test scripts evaluate, and model-opt times, what a
user deploys. It pickles as its IR (xml text and weights) and recompiles when unpickled."""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def to_numpy(item: Any) -> Any:
    """A model input (tensor, tuple of positional tensors, dict of keyword tensors) as OpenVINO takes it."""
    if isinstance(item, torch.Tensor):
        return item.detach().cpu().numpy()
    if isinstance(item, dict):
        return {k: to_numpy(v) for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        return [to_numpy(v) for v in item]
    return item


#: Keyword inputs a converted model may have been traced without, and the value for which leaving them out gives
#: the original's result (BERT's tokenizers return all-zero ``token_type_ids`` by default).
NEUTRAL_INPUTS = {"token_type_ids": 0, "attention_mask": 1}


def ov_call(compiled: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a compiled OpenVINO model on positional and keyword torch inputs; torch outputs back. A keyword input
    the IR has no port for is left out when its value is the neutral one (:data:`NEUTRAL_INPUTS`), which gives
    the torch model's result; any other is refused, naming it."""
    if kwargs:
        names = [port.get_any_name() for port in compiled.inputs]
        known = {name for port in compiled.inputs for name in port.get_names()}
        kwargs = {k: v for k, v in kwargs.items() if k in known or not _neutral(k, v)}
        feed: Any = {**dict(zip(names, to_numpy(list(args)), strict=False)), **to_numpy(kwargs)}
    else:
        feed = to_numpy(list(args))
    result = compiled(feed)
    outputs = tuple(torch.from_numpy(result[out].copy()) for out in compiled.outputs)
    return outputs[0] if len(outputs) == 1 else outputs


def _neutral(name: str, value: Any) -> bool:
    """Whether a keyword input the IR lacks can be left out (its neutral value); else a ValueError naming it."""
    neutral = NEUTRAL_INPUTS.get(name)
    if neutral is not None and (value is None or bool((torch.as_tensor(value) == neutral).all())):
        return True
    raise ValueError(f"this OpenVINO model was converted without the input {name!r}"
                     + (f", so it gives the original's result only when {name} is all {neutral}s" if neutral is not None
                        else "") + "; leave it out, or convert again with it in the example input")


def output_spec(model: nn.Module, example: Any) -> dict[str, Any] | None:
    """The original's output type when it is a Hugging Face ``ModelOutput`` (class and field names), so that the
    OpenVINO module answers ``out.last_hidden_state`` as the original did; None for tensors and tuples."""
    from model_opt.measure import call_model

    with torch.no_grad():
        out = call_model(model, example)
    kind = type(out)
    if not (kind.__module__.startswith("transformers.") and callable(getattr(out, "keys", None))):
        return None
    return {"class": f"{kind.__module__}:{kind.__qualname__}", "keys": list(out.keys())}


def as_original_output(outputs: Any, spec: dict[str, Any] | None) -> Any:
    """OpenVINO's outputs (in the order the original returned them) as the original's ``ModelOutput``."""
    if not spec:
        return outputs
    import importlib

    module, _, name = str(spec.get("class", "")).partition(":")
    if not module.startswith("transformers."):  # only transformers' own output classes are rebuilt
        return outputs
    from transformers.utils import ModelOutput

    kind = getattr(importlib.import_module(module), name, None)
    values = outputs if isinstance(outputs, tuple) else (outputs,)
    if not (isinstance(kind, type) and issubclass(kind, ModelOutput)) or len(values) != len(spec["keys"]):
        return outputs
    return kind(**dict(zip(spec["keys"], values, strict=True)))


def serialize(ov_model: Any) -> tuple[bytes, bytes]:
    """An OpenVINO model's IR as bytes: (xml, bin)."""
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="model-opt-ov-") as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(ov_model, xml, compress_to_fp16=False)
        return xml.read_bytes(), xml.with_suffix(".bin").read_bytes()


#: The operations whose constant inputs are a model's weights: compute layers, embedding lookups (Gather), scales
#: (Multiply: a normalization's weight), biases (Add), and the int8 weights of a quantized or compressed model.
WEIGHT_CONSUMERS = ("Convolution", "GroupConvolution", "MatMul", "FakeQuantize", "Convert", "Add", "Gather",
                    "Multiply")
#: The IR of a folder output: the names optimum-intel's OVModel classes open.
FOLDER_IR = "openvino_model.xml"
#: The largest IR topology (``.xml``) read: large language models stay well below it.
MAX_IR_XML_BYTES = 256 * 2**20


class OpenVINOModule(nn.Module):
    """A compiled OpenVINO model behind ``forward``: torch tensors in, torch tensors out."""

    #: model-opt times a model of another runtime than the original's in a process of its own.
    deployed_runtime = "openvino"

    def __init__(self, ov_model: Any = None, device: str = "CPU", compile_config: dict[str, Any] | None = None) -> None:
        """``ov_model=None`` makes an empty module that :meth:`load_state_dict` fills from saved IR.

        ``compile_config``: ``performance_hint`` ("LATENCY" or "THROUGHPUT") and ``static_shapes`` (the input
        shapes to compile for, by input name or position; None keeps the IR's dynamic shapes). The IR itself
        stays as converted; these settings apply when it is compiled, here and when it is reopened."""
        super().__init__()
        # test scripts often ask next(model.parameters()).device: an empty CPU parameter answers
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.ov_device = device
        self.compile_config = dict(compile_config or {})
        if ov_model is not None:
            self._xml, self._bin = serialize(ov_model)
            self._compile()

    def _compile(self) -> None:
        import openvino as ov

        core = ov.Core()
        if not isinstance(self._bin, bytearray):  # (a writable buffer: OpenVINO shares it instead of copying it)
            self._bin = bytearray(self._bin)
        self.ov_model = core.read_model(model=self._xml.decode(), weights=ov.Tensor(
            np.frombuffer(self._bin, dtype="uint8"), shared_memory=True))
        hint = self.compile_config.get("performance_hint")
        config = {"PERFORMANCE_HINT": hint} if hint else {}
        self.compiled = core.compile_model(self._runnable(self.ov_model), self.ov_device, config)
        self.compiled_static = None
        shapes = self.compile_config.get("static_shapes")
        if shapes:  # a second compilation for the fixed shapes; calls with other shapes use the dynamic one
            keyed = shapes.items() if isinstance(shapes, dict) else enumerate(shapes)
            static = self.ov_model.clone()
            static.reshape({key: ov.PartialShape(list(shape)) for key, shape in keyed})
            self.compiled_static = core.compile_model(static, self.ov_device, config)
            self._static_shapes = shapes

    def _runnable(self, ov_model: Any) -> Any:
        """The model that is compiled and run: the IR as it is (a subclass may run a transformed copy; the IR
        itself is what is saved)."""
        return ov_model

    def keep_float(self, ir: tuple[bytes, bytes]) -> OpenVINOModule:
        """Keep the float IR this model was compressed or quantized from (``serialize``d before NNCF ran), for
        :meth:`float_counterpart`; it is not saved with the model."""
        self._float_ir = ir
        return self

    def float_counterpart(self) -> OpenVINOModule | None:
        """The float model in the same runtime, compiled the same way (what OpenVINO gives without the technique);
        None when this one was not made here (a reopened result)."""
        ir = getattr(self, "_float_ir", None)
        if ir is None:
            return None
        twin = type(self)(compile_config=self.compile_config)
        twin._xml, twin._bin = ir
        twin._compile()
        return twin

    def describe_compile(self) -> str:
        """How the IR is compiled, for the report."""
        shapes = self.compile_config.get("static_shapes")
        shape_text = "dynamic shapes" if not shapes else "static shapes " + ", ".join(
            "x".join(map(str, s)) for s in (shapes.values() if isinstance(shapes, dict) else shapes)) + \
            " (other shapes: dynamic)"
        return f"{shape_text}, PERFORMANCE_HINT={self.compile_config.get('performance_hint') or 'default'}"

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        static = self.compiled_static is not None and self._matches_static(args, kwargs)
        return as_original_output(ov_call(self.compiled_static if static else self.compiled, args, kwargs),
                                  self.compile_config.get("outputs"))

    def _matches_static(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        shapes = self._static_shapes
        if isinstance(shapes, dict):
            return all(k in kwargs and list(kwargs[k].shape) == s for k, s in shapes.items())
        return len(args) == len(shapes) and all(list(a.shape) == s for a, s in zip(args, shapes, strict=True))

    def parameter_count(self) -> tuple[int, int]:
        """(weights, non-zero weights) of the constants feeding compute layers, embedding lookups and scales (not
        integer indices), as model-opt reports them: a torch model's parameters, counted the same way."""
        total = 0
        for op in self.ov_model.get_ops():
            if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() not in ("i32", "i64") \
                    and any(target.get_node().get_type_name() in WEIGHT_CONSUMERS
                            for output in op.outputs() for target in output.get_target_inputs()):
                shape = op.get_output_shape(0)
                count = 1
                for dim in shape:
                    count *= dim
                total += count if len(shape) > 1 else 0
        return total, total

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ov_model.get_ops():
            counts[op.get_type_name()] = counts.get(op.get_type_name(), 0) + 1
        return counts

    def save_native(self, artifact: str | os.PathLike[str]) -> list[Path]:
        """Write ``<artifact>.xml`` / ``.bin`` (OpenVINO IR) beside the model-opt artifact, atomically; given a
        folder, ``openvino_model.xml/.bin`` inside it (the layout optimum-intel opens)."""
        from model_opt.atomic import atomic_path

        xml = Path(artifact) / FOLDER_IR if Path(artifact).is_dir() else Path(artifact).with_suffix(".xml")
        with atomic_path(xml.with_suffix(".bin")) as tmp:
            tmp.write_bytes(self._bin)
        with atomic_path(xml) as tmp:
            tmp.write_bytes(self._xml.replace(b"model.bin", xml.with_suffix(".bin").name.encode()))
        return [xml, xml.with_suffix(".bin")]

    def load_native(self, folder: str | os.PathLike[str]) -> None:
        """Read the IR that :meth:`save_native` wrote into ``folder`` (no code runs from it) and compile it."""
        from model_opt.modelio import read_regular

        xml = Path(folder) / FOLDER_IR  # (regular files only: a pipe or a device would never end)
        self._xml = read_regular(xml, MAX_IR_XML_BYTES).replace(xml.with_suffix(".bin").name.encode(), b"model.bin")
        self._bin = read_regular(xml.with_suffix(".bin"))
        self._compile()

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The IR as uint8 tensors: model-opt artifacts save it as plain weights, and size-on-disk
        measurements see the deployed model."""
        destination = OrderedDict() if destination is None else destination
        destination[prefix + "ir_xml"] = torch.frombuffer(bytearray(self._xml), dtype=torch.uint8)
        destination[prefix + "ir_bin"] = torch.frombuffer(bytearray(self._bin), dtype=torch.uint8)
        return destination

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Compile the IR held in ``state_dict`` (OpenVINO IR is read without running code from it)."""
        expected = {"ir_xml", "ir_bin"}
        unexpected = [k for k in state_dict if k not in expected]
        if not expected <= set(state_dict) or (strict and unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for OpenVINOModule: expected ir_xml and ir_bin, "
                               f"got {sorted(state_dict)[:5]}")
        self._xml = state_dict["ir_xml"].cpu().numpy().tobytes()
        self._bin = state_dict["ir_bin"].cpu().numpy().tobytes()
        self._compile()
        return nn.modules.module._IncompatibleKeys([], unexpected)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_float_ir", None)  # (only the run that made it times it)
        state.pop("ov_model", None)
        state.pop("compiled", None)
        state.pop("compiled_static", None)
        state.pop("_request", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._compile()

    @classmethod
    def from_ir(cls, xml: str | os.PathLike[str], device: str = "CPU") -> OpenVINOModule:
        """An IR file (``.xml`` with its ``.bin`` beside it), both read as regular files only."""
        import openvino as ov
        from model_opt.errors import ModelLoadError
        from model_opt.modelio import read_regular

        xml = Path(xml)
        if not xml.with_suffix(".bin").exists():
            raise ModelLoadError(f"{xml.name} is OpenVINO IR without its weights file {xml.with_suffix('.bin').name} "
                                 "beside it", "put the .bin the IR was saved with beside the .xml")
        text, weights = read_regular(xml, MAX_IR_XML_BYTES), read_regular(xml.with_suffix(".bin"))
        return cls(ov.Core().read_model(model=text.decode(), weights=ov.Tensor(
            np.frombuffer(weights, dtype="uint8").copy())), device)
