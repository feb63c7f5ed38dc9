"""The digits example: a small CNN trained on 8x8 handwritten digits that ship in the package.

:func:`prepare` lays out a working folder as a user would have it: ``model.pth`` (a state_dict),
``data/`` (train/test splits), ``eval.py`` (in-process test script), ``eval_program.py`` (program
contract) and ``digits_model.py`` (the architecture), and trains the model in a few seconds.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
FILES = ("digits_model.py", "eval.py", "eval_program.py")
#: Left in a folder the demo wrote, so that running it again there may replace its own files.
MARKER = ".model-opt-demo"
WRITES = (*FILES, "data", "model.pth", "model_whole.pth")


def check_demo_folder(folder: str | Path) -> None:
    """Refuse a folder where the example would replace files the demo did not write."""
    from model_opt.errors import UsageError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--folder {folder} is a file", "pass a new or empty folder for the demo")
    if folder.is_dir() and not (folder / MARKER).exists():
        clashes = [name for name in WRITES if (folder / name).exists()]
        if clashes:
            raise UsageError(f"--folder {folder} already holds {', '.join(clashes)}, which the demo would replace",
                             "pass a new or empty folder, e.g. --folder model-opt-demo")
    if folder.is_dir():  # the optimized model and the files beside it, checked before training
        from model_opt.outputs import check_output

        check_output(folder / "model.optimized.pt", [folder / "data"], flag="--folder")


@dataclass
class Example:
    folder: Path
    model: Path
    dataset: Path
    script: Path
    program_script: Path
    whole_model: Path


def prepare(folder: str | Path, epochs: int = 12, seed: int = 0) -> Example:
    """Write the example into ``folder`` and train it; returns the paths."""
    import sys

    import numpy as np
    import torch

    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("written by model-opt demo\n")
    for name in FILES:
        shutil.copy(HERE / name, folder / name)
    data = np.load(HERE / "digits.npz")
    images, labels = data["images"], data["labels"]
    n_test = 360
    np.savez(folder / "data" / "test.npz", images=images[:n_test], labels=labels[:n_test])
    np.savez(folder / "data" / "train.npz", images=images[n_test:], labels=labels[n_test:])

    sys.path.insert(0, str(folder))
    try:
        import digits_model  # the copy beside eval.py, so pickles refer to `digits_model.DigitsNet`
    finally:
        sys.path.remove(str(folder))
    torch.manual_seed(seed)
    model = digits_model.DigitsNet()
    x = torch.from_numpy(images[n_test:]).float().div(16.0).unsqueeze(1)
    y = torch.from_numpy(labels[n_test:]).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    torch.save(model.state_dict(), folder / "model.pth")
    torch.save(model, folder / "model_whole.pth")
    return Example(folder, folder / "model.pth", folder / "data", folder / "eval.py",
                   folder / "eval_program.py", folder / "model_whole.pth")
