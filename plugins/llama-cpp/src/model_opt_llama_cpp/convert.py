"""A transformers causal LM (Llama or GPT-2 architecture) written as a float32 GGUF file with the ``gguf``
package (llama.cpp's own Python library: its writer, architecture keys and tensor-name map), its tokenizer
included; llama.cpp's quantizer then makes the requested type from it (:mod:`.quantize`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from model_opt.errors import TechniqueError
from torch import nn

from .vocab import read_vocab, special_ids

#: transformers architectures and the llama.cpp architecture each is written as.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}


def architecture(model: nn.Module) -> str:
    """llama.cpp's name for the model's architecture; any other is refused in one line that names it."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise TechniqueError(f"model-opt writes GGUF for the Llama and GPT-2 architectures, and this model is a "
                             f"{name}", "convert it with llama.cpp's convert_hf_to_gguf.py, or use nncf weight_only "
                             "runtime=openvino")
    return ARCHITECTURES[name]


def write_gguf(model: nn.Module, tokenizer_folder: Path, path: Path, name: str) -> dict[str, Any]:
    """Write ``model`` as float32 GGUF to ``path``; returns what the report says of the conversion."""
    import gguf

    arch = architecture(model)
    config = model.config
    tensors = list(_tensors(model, arch))
    n_vocab = int(dict(tensors)["token_embd.weight"].shape[0])
    vocab = read_vocab(tokenizer_folder, n_vocab)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    (_llama_keys if arch == "llama" else _gpt2_keys)(writer, config, dict(tensors))
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    special_ids(tokenizer_folder, writer, n_vocab, merges=vocab.model == "gpt2")
    for key, array in tensors:
        writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "tokenizer": f"{vocab.model} ({vocab.pre})", "tensors": len(tensors)}


def _tensors(model: nn.Module, arch: str) -> Any:
    """(GGUF name, float32 array) of every parameter, in llama.cpp's layout: GPT-2's Conv1D weights transposed,
    Llama's query and key rows reordered for llama.cpp's rotary embedding. A parameter the map does not know
    (a layer an earlier step added) is refused, naming it."""
    config = model.config
    names = tensor_names(model, arch)
    modules = dict(model.named_modules())
    # a head tied to the embeddings is written once: llama.cpp reads the embeddings as the head when output.weight
    # is absent (its llama and gpt2 loaders)
    for key, param in model.named_parameters():
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise TechniqueError(f"the parameter {key} has no place in a {arch} GGUF file (an earlier step changed "
                                 "the layer)", "write GGUF from the model before that step, or leave the step out")
        tensor = param.detach().to(torch.float32).cpu()
        owner = modules.get(key.rpartition(".")[0])
        if type(owner).__name__ == "Conv1D" and key.endswith(".weight"):
            tensor = tensor.T
        if arch == "llama" and target.endswith(("attn_q.weight", "attn_q.bias")):
            tensor = _rotary_order(tensor, int(config.num_attention_heads))
        elif arch == "llama" and target.endswith(("attn_k.weight", "attn_k.bias")):
            tensor = _rotary_order(tensor, int(getattr(config, "num_key_value_heads", None)
                                               or config.num_attention_heads))
        yield target, np.ascontiguousarray(tensor.numpy())


def tensor_names(model: nn.Module, arch: str) -> Any:
    """The ``gguf`` package's map from the model's parameter names to llama.cpp's tensor names."""
    import gguf

    config = model.config
    blocks = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2, blocks)


def _rotary_order(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' Llama rotates the two halves of each head; llama.cpp rotates neighbouring pairs: the rows
    of each head are interleaved accordingly."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def _rope_theta(config: Any) -> float:
    """The rotary base; rotary scaling (long-context variants) is refused: it needs keys model-opt does not
    write."""
    parameters = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise TechniqueError(f"the model uses {kind} rotary scaling, which model-opt does not write to GGUF",
                             "convert it with llama.cpp's convert_hf_to_gguf.py")
    return float(parameters.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def _llama_keys(writer: Any, config: Any, tensors: dict[str, np.ndarray]) -> None:
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(tensors["token_embd.weight"].shape[1]))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(tensors["blk.0.ffn_up.weight"].shape[0]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _gpt2_keys(writer: Any, config: Any, tensors: dict[str, np.ndarray]) -> None:
    writer.add_context_length(int(config.n_positions))
    writer.add_embedding_length(int(tensors["token_embd.weight"].shape[1]))
    writer.add_block_count(int(config.n_layer))
    writer.add_feed_forward_length(int(tensors["blk.0.ffn_up.weight"].shape[0]))
    writer.add_head_count(int(config.n_head))
    writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
