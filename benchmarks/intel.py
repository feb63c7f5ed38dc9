"""NNCF (OpenVINO) and Intel Neural Compressor int8 on timm resnet18, against PyTorch float.

    python benchmarks/intel.py

Rows: float eager, float compiled (inductor, freezing), OpenVINO float, NNCF int8 via OpenVINO, INC static
int8 compiled. Speed-ups are against float eager and float compiled, timed interleaved in one process;
agreement is top-1 agreement with float on 512 held-out random inputs (random weights, so accuracy itself
means nothing here).
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile

import timm
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import compiled, machine, table, time_models  # noqa: E402
from model_opt.techniques import Quantizer  # noqa: E402


def main() -> None:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="model-opt-bench-"))
    from model_opt_nncf.openvino_module import OpenVINOModule
    from model_opt_nncf.quantize import convert

    print(f"machine: {machine()}\n")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    calibration = [torch.randn(8, 3, 224, 224) for _ in range(8)]
    held_out = torch.randn(512, 3, 224, 224)
    example = torch.randn(8, 3, 224, 224)
    nncf_int8, _ = Quantizer().quantize(copy.deepcopy(model), method="int8_static", backend="nncf",
                                        example_input=example, calibration_data=calibration)
    inc_int8, _ = Quantizer().quantize(copy.deepcopy(model), method="int8_static", backend="neural-compressor",
                                       example_input=example, calibration_data=calibration)
    ov_float = OpenVINOModule(convert(model, example))
    with torch.inference_mode():
        reference = torch.cat([model(b) for b in held_out.split(64)]).argmax(1)
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        candidates = {
            "float eager": model,
            "float compiled": compiled(model, x),
            "OpenVINO float": ov_float,
            "NNCF int8 (OpenVINO)": nncf_int8,
            "INC static int8 (compiled)": compiled(inc_int8, x),
        }
        times = time_models(candidates, x, rounds=7)
        for name, candidate in candidates.items():
            with torch.inference_mode():
                predictions = torch.cat([candidate(b) for b in held_out.split(64)]).argmax(1) \
                    if batch == 8 else None
            rows.append({"resnet18": f"b{batch}", "runtime": name,
                         "vs float eager": times["float eager"] / times[name],
                         "vs float compiled": times["float compiled"] / times[name],
                         "top-1 agreement": "-" if predictions is None else
                         f"{(predictions == reference).float().mean().item():.3f}"})
    print(table("resnet18 (random weights): speed-ups (>1 is faster) and top-1 agreement with float", rows))


if __name__ == "__main__":
    main()
