"""Test script for the digits example in the program contract.

model-opt runs `python eval_program.py` with MODEL_OPT_MODEL (a torch.save-d module),
MODEL_OPT_DATASET and MODEL_OPT_DEVICE set, and reads every `name = number` line as a metric.
"""

import os
from pathlib import Path

import numpy as np
import torch

model = torch.load(os.environ["MODEL_OPT_MODEL"], weights_only=False)
device = os.environ.get("MODEL_OPT_DEVICE", "cpu")
data = np.load(Path(os.environ["MODEL_OPT_DATASET"]) / "test.npz")
images = torch.from_numpy(data["images"]).float().div(16.0).unsqueeze(1)
labels = torch.from_numpy(data["labels"]).long()
with torch.no_grad():
    predictions = model.to(device).eval()(images.to(device)).argmax(dim=1).cpu()
print(f"accuracy = {(predictions == labels).float().mean().item():.6f}")
