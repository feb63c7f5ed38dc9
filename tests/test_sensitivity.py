"""model-opt sensitivity: one technique applied to one group of layers at a time, ranked by the drop of the user's
own metric; a table, a JSON that reloads and a chart; cached; bad flags are one-line errors and write nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_bad_input import listing, one_error

INT8 = ["--quantize", "--quant-backend", "nncf", "--quant-method", "int8_static"]


@pytest.fixture()
def work(digits, tmp_path: Path, monkeypatch) -> Path:
    """The digits example with a fidelity metric (any change lowers it), and a cache of this test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "work"
    shutil.copytree(digits.folder, folder)
    (folder / "fidelity").mkdir()
    shutil.copy(folder / "model.pth", folder / "fidelity" / "model.pth")
    shutil.copy(folder / "digits_model.py", folder / "fidelity")
    (folder / "fidelity" / "eval.py").write_text(digits.script.read_text().replace(
        'return {"accuracy": (predictions == labels).float().mean().item()}',
        'reference = load_model(Path(dataset_path).parent / "model.pth").eval()(images)\n'
        '    return {"fidelity": 1 - (model(images) - reference).abs().mean().item()}'))
    return folder


def test_groups_are_blocks_then_what_lies_outside_them() -> None:
    from model_opt.sensitivity import layer_groups
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    groups = {g.name: g.layers for g in layer_groups(model)}
    assert list(groups) == ["model.layers.0", "model.layers.1", "model.layers.2", "model.embed_tokens", "lm_head"]
    assert len(groups["model.layers.1"]) == 7 and groups["lm_head"] == ["lm_head"]
    small = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert [g.name for g in layer_groups(small)] == ["0", "2"]  # a small model: layer by layer


@pytest.mark.slow
def test_the_ranking_is_written_as_json_and_a_chart_and_cached(cli, work: Path) -> None:
    script = work / "fidelity" / "eval.py"
    args = ("sensitivity", work / "fidelity" / "model.pth", "--test-dataset", work / "data", "--test-script", script,
            *INT8, "--max-accuracy-drop", "0.001")
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    out = work / "fidelity" / "model.sensitivity.json"
    saved = json.loads(out.read_text())
    assert saved["format"] == "model-opt-sensitivity" and saved["technique"] == "quantize:nncf:int8_static"
    drops = [g["drop"] for g in saved["groups"]]
    assert [g["group"] for g in saved["groups"]] and drops == sorted(drops, reverse=True)
    assert {g["group"] for g in saved["groups"]} == {"features.0", "features.3", "classifier.1", "classifier.3"}
    assert max(drops) > 0 and sum(g["share"] for g in saved["groups"]) == pytest.approx(1.0)
    assert saved["files"] == ["model.sensitivity.json", "model.sensitivity.png"]
    assert "sensitivity of fidelity" in result.stdout and saved["groups"][0]["group"] in result.stdout
    from PIL import Image

    with Image.open(out.with_suffix(".png")) as image:
        assert image.size[0] >= 600 and image.size[1] >= 200
    again = cli(*args)  # the same model, technique and options: read from the cache, written again
    assert again.exit_code == 0 and "from an earlier run" in again.stderr
    assert json.loads(out.read_text())["groups"] == saved["groups"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--eval-fraction", "0"], "--eval-fraction is 0.0; pass a share of the data above 0 and up to 1"),
    (["--refine", "-1"], "--refine is -1"),
    (["--prune"], "sensitivity measures one technique, and 2 were asked for"),
    (["--output", "notes.txt"], "--output notes.txt does not end in .json"),
])
def test_bad_flags_are_one_line_and_write_nothing(cli, work: Path, extra: list, message: str) -> None:
    before = listing(work)
    line = one_error(cli("sensitivity", work / "model.pth", "--test-dataset", work / "data", "--test-script",
                         work / "eval.py", *INT8, *extra))
    assert message in line
    assert listing(work) == before


def test_a_technique_without_an_exclude_option_is_refused(cli, work: Path) -> None:
    pytest.importorskip("neural_compressor")
    line = one_error(cli("sensitivity", work / "model.pth", "--test-dataset", work / "data", "--test-script",
                         work / "eval.py", "--quantize", "--quant-backend", "neural-compressor", "--quant-method",
                         "autotune"))
    assert "neural-compressor autotune has no exclude option" in line


def test_a_users_json_or_chart_is_never_replaced(cli, work: Path) -> None:
    (work / "model.sensitivity.png").write_text("the user's picture")
    before = listing(work)
    line = one_error(cli("sensitivity", work / "model.pth", "--test-dataset", work / "data", "--test-script",
                         work / "eval.py", *INT8))
    assert "would replace model.sensitivity.png beside it" in line
    assert listing(work) == before


@pytest.mark.slow
def test_a_causal_lms_blocks_are_ranked_the_same_twice_and_the_top_one_matters(cli, lm, tmp_path: Path,
                                                                               short_lm_windows, monkeypatch) -> None:
    """NNCF int4 weights on the trained tiny GPT-2, built-in evaluation (perplexity) on half its windows: the same
    ranking on two runs (no cache), and keeping the most costly group in float lowers the drop."""
    pytest.importorskip("nncf")
    import model_opt
    from model_opt.builtin import lm_eval
    from model_opt.techniques import Quantizer

    runs = []
    for index in range(2):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / f"cache{index}"))
        out = tmp_path / f"s{index}.json"
        result = cli("sensitivity", lm["gpt2"], "--test-dataset", lm["text"], "--quantize", "--quant-backend",
                     "nncf", "--quant-method", "weight_only", "--quant-opt", "mode=int4_sym", "--quant-opt",
                     "group_size=32", "--eval-fraction", "0.5", "--output", out)
        assert result.exit_code == 0, result.stderr
        runs.append(json.loads(out.read_text()))
    assert [g["group"] for g in runs[0]["groups"]] == [g["group"] for g in runs[1]["groups"]]
    assert runs[0]["metric"] == "perplexity" and runs[0]["higher_is_better"] is False
    top = runs[0]["groups"][0]
    model = model_opt.load(lm["gpt2"])
    perplexity = lambda m: lm_eval.evaluate(m, str(lm["text"]), str(lm["gpt2"]), fraction=0.5)["perplexity"]  # noqa: E731
    base = perplexity(model)
    example = lm_eval.example_input(str(lm["text"]), str(lm["gpt2"]))
    options = {"mode": "int4_sym", "group_size": 32}
    everything, _ = Quantizer().quantize(model_opt.load(lm["gpt2"]), method="weight_only", backend="nncf",
                                         example_input=example, **options)
    kept, _ = Quantizer().quantize(model_opt.load(lm["gpt2"]), method="weight_only", backend="nncf",
                                   example_input=example, exclude=top["layers"], **options)
    assert perplexity(kept) - base < perplexity(everything) - base


@pytest.mark.slow
def test_optimize_keeps_the_most_sensitive_layers_unchanged_to_meet_the_budget(cli, work: Path) -> None:
    """torchao int8 weights (any quantizer with an exclude option): over the budget, the most sensitive group is
    kept in float, the result is within the budget, the report says what was kept and what costs most, and the
    artifact replays the exclusion."""
    import model_opt

    pytest.importorskip("torchao")
    folder = work / "fidelity"
    args = ("optimize", folder / "model.pth", "--test-dataset", work / "data", "--test-script", folder / "eval.py",
            "--quantize", "--quant-backend", "torchao", "--quant-method", "int8_weight_only", "--quant-opt",
            "skip_head=false", "--json", "-q")
    whole = cli(*args, "--output", folder / "all.pt")
    assert whole.exit_code == 0, whole.stderr
    drop = json.loads(whole.stdout)["metric_drop"]
    assert drop > 0
    budget = 0.6 * drop
    result = cli(*args, "--output", folder / "mixed.pt", "--max-accuracy-drop", str(budget))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metric_drop"] <= budget and report["kept_unchanged"]
    kept = [n for g in report["kept_unchanged"] for n in g["layers"]]
    assert report["sensitive_groups"][0]["group"] == report["kept_unchanged"][0]["group"]
    assert report["steps"][0]["options"]["exclude"] == sorted(kept)
    reopened = model_opt.load(folder / "mixed.pt", test_script=folder / "eval.py")
    assert type(reopened.get_submodule(kept[0]).weight).__name__ == "Parameter"  # kept in float, as recorded
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(reopened(x), model_opt.load(folder / "mixed.pt", test_script=folder / "eval.py")(x))
    line = one_error(cli(*args, "--output", folder / "never.pt", "--max-accuracy-drop", "0"), exit_code=1)
    assert "no mix of changed and unchanged layer groups stays within --max-accuracy-drop 0" in line
    assert not (folder / "never.pt").exists()


@pytest.mark.slow
def test_autotune_proposes_mixes_that_keep_the_most_sensitive_groups_in_float(cli, work: Path) -> None:
    """A quantizer with an exclude option is searched with 0, 1 or 2 of its most sensitive layer groups kept in
    float: the groups ``model-opt sensitivity`` ranks first, not names drawn at random."""
    from dataclasses import replace

    import optuna
    from model_opt.autotune import check_space, measure_baseline
    from model_opt.job import Job, Settings
    from model_opt.tuning_trials import Objective, TuneSettings

    folder = work / "fidelity"
    common = (folder / "model.pth", "--test-dataset", work / "data", "--test-script", folder / "eval.py")
    ranked = cli("sensitivity", *common, *INT8, "--json", "-q")
    assert ranked.exit_code == 0, ranked.stderr
    groups = [g["layers"] for g in json.loads(ranked.stdout)["groups"]]
    tune = TuneSettings(backends=["nncf"]).check()
    job = Job.prepare(folder / "model.pth", test_script=folder / "eval.py", dataset=work / "data",
                      settings=replace(Settings.of({}, "autotune"), max_accuracy_drop=0.5))
    job.load()
    space = check_space(job, tune, family=job.family)
    objective = Objective(job, job.context(), space, measure_baseline(job), tune)

    def proposed(keep: int) -> dict:
        params = {kind: "none" for kind in space} | {"quantize": "quantize:nncf:int8_static", "runtime": "eager",
                                                     "recovery_steps": 0, "quantize:nncf:int8_static.keep_float": keep}
        steps, _, _ = objective.propose(optuna.trial.FixedTrial(params))
        (step,) = steps
        return step["options"]

    assert "exclude" not in proposed(0)
    first = proposed(1)
    assert "exclude" in first, objective.rankings
    assert first["exclude"] == sorted(groups[0])
    assert proposed(2)["exclude"] == sorted({*groups[0], *groups[1]})


def test_the_fewest_layers_kept_are_found_by_bisection() -> None:
    """``fewest_kept`` on a metric that is the sum of the drops of the layers changed: it keeps the most costly
    layers, as few as meet the budget, measuring a handful of counts, not every one."""
    from model_opt.sensitivity import Sensitivity, fewest_kept

    costs = {"a": 0.5, "b": 0.3, "c": 0.1, "d": 0.05, "e": 0.03, "f": 0.02}
    layers = [Sensitivity(n, [n], 0.0, cost) for n, cost in costs.items()]
    tried = []

    def attempt(kept: list[str]) -> tuple[float, str]:
        tried.append(len(kept))
        return sum(cost for n, cost in costs.items() if n not in kept), "+".join(kept)

    kept, result = fewest_kept(layers, attempt, budget=0.12, progress=lambda _: None)
    assert [k.group for k in kept] == ["a", "b", "c"] and result == "a+b+c"
    assert len(tried) <= 3
    assert fewest_kept(layers, attempt, budget=0.0, progress=lambda _: None) is None  # only all six do


@pytest.mark.slow
def test_optimize_keeps_only_the_costly_layers_inside_the_costly_blocks(cli, lm, tmp_path: Path, short_lm_windows,
                                                                          monkeypatch) -> None:
    """NNCF int4 weights on the trained tiny GPT-2, measured by blocks (of four layers; a model this small is
    otherwise measured layer by layer): over the budget, the report keeps single layers, each inside a block the
    ranking put among the most costly, within the budget, and the artifact's exclude is exactly them."""
    pytest.importorskip("nncf")
    from model_opt import sensitivity

    monkeypatch.setattr(sensitivity, "LAYERWISE_UP_TO", 4)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ("optimize", lm["gpt2"], "--test-dataset", lm["text"], "--quantize", "--quant-backend", "nncf",
            "--quant-method", "weight_only", "--quant-opt", "mode=int4_sym", "--quant-opt", "group_size=32",
            "--json", "-q")
    whole = cli(*args, "--output", tmp_path / "all/")
    assert whole.exit_code == 0, whole.stderr
    drop = json.loads(whole.stdout)["metric_drop"]
    assert drop > 0
    result = cli(*args, "--output", tmp_path / "mixed/", "--max-accuracy-drop", str(0.4 * drop))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metric_drop"] <= 0.4 * drop
    kept = [n for g in report["kept_unchanged"] for n in g["layers"]]
    blocks = {n for g in report["sensitive_groups"] for n in g["layers"] if len(g["layers"]) > 1}
    assert kept and set(kept) <= blocks, report["kept_unchanged"]
    assert all(len(g["layers"]) == 1 for g in report["kept_unchanged"]), report["kept_unchanged"]
    assert report["steps"][0]["options"]["exclude"] == sorted(kept)
