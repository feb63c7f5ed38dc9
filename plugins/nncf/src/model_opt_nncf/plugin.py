"""Hook implementations of the nncf plugin: calibrated int8 deployed through OpenVINO, and NNCF pruning."""

from __future__ import annotations

from typing import Any

from model_opt.hookspecs import hookimpl
from model_opt.registry import Option, Technique

INT8_STATIC = Technique(
    kind="quantize",
    backend="nncf",
    method="int8_static",
    summary="NNCF post-training int8, calibrated on your data, deployed and measured as an OpenVINO model.",
    options=(
        Option("subset_size", int, 300, "calibration samples NNCF uses", minimum=1),
        Option("preset", str, "performance", "symmetric (performance) or asymmetric activations (mixed)",
               choices=("performance", "mixed")),
        Option("model_type", str, "auto", "transformer enables NNCF's transformer rules",
               choices=("auto", "transformer")),
        Option("fast_bias_correction", bool, True, "fast bias correction (else the slower, more accurate one)"),
        Option("ignored", list, [], "regular expressions of layer names to keep in float"),
        Option("accuracy_control", bool, True, "with --max-accuracy-drop, keep layers in float until the "
               "metric is within the budget (nncf.quantize_with_accuracy_control)"),
    ),
    needs=("example_input", "calibration_data"),
    requires=("nncf", "openvino"),
    search_space={},
    default=True,
    speeds_up=("cpu",),
    speed_note="the OpenVINO runtime runs on the CPU here",
)


@hookimpl
def register_techniques(register: Any) -> None:
    register(INT8_STATIC)


@hookimpl
def quantize(model: Any, technique: Technique, options: dict[str, Any], context: Any) -> Any:
    from model_opt.errors import DeviceError

    from .quantize import quantize_int8

    if context.device.startswith("cuda"):
        raise DeviceError("nncf int8_static deploys to the OpenVINO CPU runtime", "use --device cpu")
    return quantize_int8(model, options, context)


@hookimpl
def restore(model: Any, technique: Technique, options: dict[str, Any], state: dict[str, Any], context: Any) -> Any:
    """The quantized model is OpenVINO IR, saved as the artifact's weights: an empty module takes it."""
    from .openvino_module import OpenVINOModule

    return OpenVINOModule()


@hookimpl
def load_model(path: Any) -> Any:
    """Reopen OpenVINO IR (``.xml`` with its ``.bin``) written beside a model-opt artifact."""
    if str(path).endswith(".xml"):
        from .openvino_module import OpenVINOModule

        return OpenVINOModule.from_ir(path)
    return None
