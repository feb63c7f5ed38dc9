"""Files model-opt reads that it did not write: dataset text, model folders, IR, recipes. Only regular files are
read (a pipe or a device would hang or never end), within bounds; a recipe is checked against its weights before
the architecture it describes is built; bad recipes given to the Python API are one-line errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import model_opt
import pytest
import torch
from model_opt.errors import ModelLoadError, UsageError
from test_bad_input import listing, one_error
from test_hostile_inputs import _artifact

pytest.importorskip("transformers")


@pytest.fixture()
def llama(lm, tmp_path: Path) -> Path:
    """A copy of the session's tiny Llama folder, as a user's own."""
    folder = tmp_path / "tiny-llama"
    shutil.copytree(lm["llama"], folder)
    return folder


@pytest.fixture(scope="module")
def optimized_llama(lm, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """The tiny Llama folder, holding a link to a file outside it, pruned through the CLI with the built-in
    evaluation: (the output folder, its report, the input folder)."""
    from typer.testing import CliRunner

    from model_opt_cli.main import with_plugins

    root = tmp_path_factory.mktemp("optimized-llama")
    folder = root / "tiny-llama"
    shutil.copytree(lm["llama"], folder)
    (root / "secret.txt").write_text("the user's private key")
    (folder / "README.md").symlink_to(root / "secret.txt")
    settings = {"MODEL_OPT_LM_WINDOW": "64", "MODEL_OPT_LM_WINDOWS": "4", "MODEL_OPT_LM_PROMPT": "16",
                "MODEL_OPT_LM_GENERATE": "8", "HF_HUB_OFFLINE": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(name, value)
        result = CliRunner().invoke(with_plugins(), ["optimize", str(folder), "--test-dataset", str(lm["text"]),
                                                     "--prune", "--prune-amount", "0.2", "--output",
                                                     f"{root / 'out'}/", "--json", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return root / "out", json.loads(result.stdout), folder


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("where", ["file in the dataset folder", "the dataset itself", "link to /dev/zero"])
def test_dataset_text_that_is_not_a_regular_file_is_refused_at_once(cli, lm, llama, tmp_path: Path,
                                                                      short_lm_windows, where: str) -> None:
    data = tmp_path / "texts"
    data.mkdir()
    if where == "file in the dataset folder":
        shutil.copy(lm["text"] / "train.txt", data / "a.txt")
        _fifo(data / "b.txt")
        dataset = data
    elif where == "the dataset itself":
        dataset = _fifo(tmp_path / "corpus.txt")
    else:
        (data / "a.txt").symlink_to("/dev/zero")
        dataset = data
    before = listing(llama)
    line = one_error(cli("optimize", llama, "--test-dataset", dataset, "--prune", "--prune-amount", "0.2", "-q"))
    assert "is not a regular file" in line
    assert listing(llama) == before and not (tmp_path / "tiny-llama.optimized").exists()


def test_only_the_text_the_windows_need_is_read(lm, tmp_path: Path, short_lm_windows) -> None:
    """A corpus far larger than the windows (here a sparse 256 MB file of NULs after the text) is read only as far
    as the windows need; reading it whole would take gigabytes."""
    from model_opt.builtin import lm_eval

    corpus = tmp_path / "big.txt"
    with open(corpus, "wb") as handle:
        handle.write((lm["text"] / "train.txt").read_bytes())
        handle.truncate(256 * 2**20)
    tokens = lm_eval._tokens(str(corpus), str(lm["llama"]))
    assert tuple(tokens.shape) == (4, 64)


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("MODEL_OPT_LM_PROMPT", "-1", "MODEL_OPT_LM_PROMPT='-1' is not a whole number from 1 to 64"),
    ("MODEL_OPT_LM_PROMPT", "1000000000", "MODEL_OPT_LM_PROMPT='1000000000' is not a whole number from 1 to 64"),
    ("MODEL_OPT_LM_WINDOWS", "0", "MODEL_OPT_LM_WINDOWS='0' is not a whole number from 1 to 4096"),
    ("MODEL_OPT_LM_WINDOW", "-1", "MODEL_OPT_LM_WINDOW='-1' is not a whole number from 8 to 32768"),
    ("MODEL_OPT_LM_GENERATE", "abc", "MODEL_OPT_LM_GENERATE='abc' is not a whole number from 1 to 4096"),
])
def test_bad_lm_settings_are_refused_before_any_work(cli, llama, lm, monkeypatch, short_lm_windows, variable: str,
                                                      value: str, message: str) -> None:
    monkeypatch.setenv(variable, value)
    line = one_error(cli("optimize", llama, "--test-dataset", lm["text"], "--prune", "--prune-amount", "0.2", "-q"),
                     exit_code=2)
    assert message in line and "or unset it" in line


def test_too_little_text_says_so_without_blaming_a_script(cli, llama, tmp_path: Path, short_lm_windows) -> None:
    data = tmp_path / "short"
    data.mkdir()
    (data / "a.txt").write_text("just a few words")
    line = one_error(cli("optimize", llama, "--test-dataset", data, "--prune", "--prune-amount", "0.2", "-q"))
    assert "fewer than one window of 64 (MODEL_OPT_LM_WINDOW)" in line and "set MODEL_OPT_LM_WINDOW to at most" in line
    assert "fix the script" not in line


def test_a_pipe_inside_a_model_folder_is_refused(cli, llama, lm, short_lm_windows) -> None:
    _fifo(llama / "notes.txt")
    line = one_error(cli("optimize", llama, "--test-dataset", lm["text"], "--prune", "--prune-amount", "0.2", "-q"))
    assert "notes.txt in tiny-llama is not a regular file" in line


@pytest.mark.slow
def test_links_out_of_the_folder_are_not_copied_and_the_report_states_the_lm_lengths(optimized_llama) -> None:
    out, report, _ = optimized_llama
    assert not (out / "README.md").exists() and (out / "vocab.txt").is_file()
    assert any("README.md (a link to a file outside the model folder)" in w for w in report["warnings"])
    assert report["evaluation"] == {"window": 64, "windows": 4, "prompt": 16, "generate": 8}


@pytest.mark.slow
def test_a_model_opt_folder_optimized_again_keeps_its_steps_and_its_reference(cli, llama, lm, tmp_path: Path,
                                                                             short_lm_windows) -> None:
    """The folder is a model-opt output, not a plain Hugging Face folder: the second run replays the first run's
    steps, compares next tokens against that model (agreement 1.0 before), and its result reopens."""
    first, second = tmp_path / "first", tmp_path / "second"
    result = cli("optimize", llama, "--test-dataset", lm["text"], "--prune", "--prune-amount", "0.3",
                 "--output", f"{first}/", "-q")
    assert result.exit_code == 0, result.stderr
    result = cli("optimize", first, "--test-dataset", lm["text"], "--decompose", "--rank-ratio", "0.5",
                 "--output", f"{second}/", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["before"]["metrics"]["next_token_agreement"] == 1.0
    recipe = json.loads((second / "model_opt.json").read_text())
    assert [s["backend"] for s in recipe["steps"]] == ["basic", "svd"]
    reopened = model_opt.load(second)
    ids = torch.randint(0, 30000, (1, 16))
    from model_opt.builtin import lm_eval

    assert lm_eval.evaluate(reopened, str(lm["text"]), str(llama))["perplexity"] == pytest.approx(
        report["after"]["metrics"]["perplexity"], rel=1e-4)
    assert reopened(input_ids=ids).logits.shape == (1, 16, 30522)


@pytest.mark.slow
def test_a_hub_id_writes_its_output_in_the_working_directory(cli, lm, tmp_path: Path, monkeypatch,
                                                             short_lm_windows) -> None:
    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--org--tiny" / "snapshots" / "0123abc"
    shutil.copytree(lm["llama"], snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0123abc")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # (read at import from the env)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = listing(cache)
    result = cli("optimize", "org/tiny", "--test-dataset", lm["text"], "--prune", "--prune-amount", "0.2", "-q")
    assert result.exit_code == 0, result.stderr
    assert (work / "tiny.optimized" / "model_opt.json").is_file() and (work / "tiny.optimized.report.json").is_file()
    assert listing(cache) == before


# -- recipes and IR that were tampered with -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_recipe_asking_for_far_more_layers_than_its_weights_hold_is_refused(optimized_llama,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(optimized_llama[0], out)
    recipe = json.loads((out / "model_opt.json").read_text())
    recipe["source"]["config"]["num_hidden_layers"] = 100000
    (out / "model_opt.json").write_text(json.dumps(recipe))
    with pytest.raises(ModelLoadError, match="asks for num_hidden_layers=100000, and the saved weights hold 2"):
        model_opt.load(out)
    recipe["source"]["config"]["num_hidden_layers"] = 2
    recipe["source"]["config"]["intermediate_size"] = 4_000_000  # 2 x 3 x 64 x 4M floats: 6 GiB on the meta device
    (out / "model_opt.json").write_text(json.dumps(recipe))
    with pytest.raises(ModelLoadError, match="describes a model of .* GiB, and the saved weights are"):
        model_opt.load(out)


@pytest.mark.parametrize("member", ["openvino_model.xml", "openvino_model.bin"])
def test_an_ir_file_that_is_a_pipe_or_a_device_is_refused(tmp_path: Path, member: str) -> None:
    from model_opt_nncf.openvino_module import OpenVINOModule

    folder = tmp_path / "ir"
    folder.mkdir()
    (folder / "openvino_model.xml").write_text("<net/>")
    (folder / "openvino_model.bin").write_bytes(b"")
    (folder / member).unlink()
    _fifo(folder / member)
    with pytest.raises(ModelLoadError, match=f"{member} is not a regular file"):
        OpenVINOModule().load_native(folder)
    (folder / member).unlink()
    (folder / member).symlink_to("/dev/urandom")
    with pytest.raises(ModelLoadError, match=f"{member} is not a regular file"):
        OpenVINOModule.from_ir(folder / "openvino_model.xml")


def test_api_recipes_of_the_wrong_shape_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no weights"):
        model_opt.load(_artifact(tmp_path / "a.pt", {"weights": ["weights.pt"], "steps": []},
                                 torch.nn.Linear(2, 2).state_dict()), model=torch.nn.Linear(2, 2))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UsageError, match="manifest steps are a int, not a list"):
        model_opt.save(model, tmp_path / "b.pt", manifest={"steps": 5})
    with pytest.raises(UsageError, match="manifest step 0 is not a step record"):
        model_opt.save(model, tmp_path / "c.pt", manifest={"steps": [{"kind": "prune"}]})
    with pytest.raises(UsageError, match="manifest is a list, not a mapping"):
        model_opt.save(model, tmp_path / "d.pt", manifest=[])
    assert list(tmp_path.iterdir()) == [tmp_path / "a.pt"]
