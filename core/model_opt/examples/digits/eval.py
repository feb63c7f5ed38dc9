"""Test script for the digits example (model-opt's in-process contract).

model-opt calls evaluate(model, dataset_path) before and after optimizing; the other functions are
optional hooks: load_model builds the architecture for a state_dict file, example_input is what
latency is measured on, calibration_data feeds calibrated quantization, labelled_data gives gradient
criteria their loss, train drives recovery fine-tuning.
"""

from pathlib import Path

import numpy as np
import torch
from digits_model import DigitsNet

HIGHER_IS_BETTER = True


def _split(dataset_path, name):
    data = np.load(Path(dataset_path) / f"{name}.npz")
    images = torch.from_numpy(data["images"]).float().div(16.0).unsqueeze(1)
    return images, torch.from_numpy(data["labels"]).long()


def load_model(path):
    model = DigitsNet()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def evaluate(model, dataset_path):
    images, labels = _split(dataset_path, "test")
    device = next(model.parameters()).device
    with torch.no_grad():
        predictions = model(images.to(device)).argmax(dim=1).cpu()
    return {"accuracy": (predictions == labels).float().mean().item()}


def example_input(dataset_path):
    return _split(dataset_path, "test")[0][:32]


def calibration_data(dataset_path):
    """Model inputs for calibrated quantization (a tensor each; a tuple or a dict for multi-input models)."""
    images, _ = _split(dataset_path, "train")
    return [images[i:i + 32] for i in range(0, 320, 32)]


def labelled_data(dataset_path):
    """(inputs, labels) pairs, for gradient-based pruning criteria (torch-pruning taylor)."""
    images, labels = _split(dataset_path, "train")
    return [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 320, 32)]


def train(model, dataset_path, steps):
    images, labels = _split(dataset_path, "train")
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(labels), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(images[batch].to(device)), labels[batch].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model
