"""Small parts with their own contract: the smoothed autotune ETA, the summary-first report JSON, Hub ids
resolved from the local Hugging Face cache only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_eta_moves_at_most_a_third_per_trial(monkeypatch) -> None:
    from model_opt import tuning_trials

    now = [1000.0]
    monkeypatch.setattr(tuning_trials.time, "time", lambda: now[0])
    eta = tuning_trials.Eta(trials=10, done_before=0, timeout=None)
    shown = []
    for finished, elapsed in ((1, 5.0), (2, 60.0), (3, 62.0), (4, 63.0)):  # a slow trial, then fast ones
        now[0] = 1000.0 + elapsed
        shown.append(float(eta.text(finished).strip("~s left")))
    assert shown[0] == pytest.approx(45.0)
    assert all(b <= a * 4 / 3 + 1e-6 and b >= a * 2 / 3 - 1e-6 for a, b in zip(shown, shown[1:], strict=False))


def test_report_json_puts_the_summary_first_and_replay_state_last() -> None:
    from model_opt.measure import Latency
    from model_opt.report import Measurement, Report, StepRecord

    before = Measurement({"accuracy": 0.99}, "accuracy", 100, 100, 4000, Latency(2.0, 2.2, 50, spread=0.05), None)
    after = Measurement({"accuracy": 0.98}, "accuracy", 50, 50, 2000, Latency(1.0, 1.1, 50, spread=0.05), None)
    step = StepRecord("prune", "torch-pruning", "structured", "torch-pruning", {"amount": 0.5}, {"changed": True},
                      1.0, state={"shapes": {"fc.weight": [5, 10]}})
    report = Report("m.pt", "cpu", 2, True, before, after, [step])
    data = json.loads(report.to_json())
    assert list(data)[0] == "summary" and list(data)[-1] == "details"
    assert data["summary"]["speedup"] == pytest.approx(2.0) and data["summary"]["size_ratio"] == 0.5
    assert data["summary"]["techniques"] == ["prune torch-pruning:structured"]
    assert "state" not in data["steps"][0] and data["details"]["replay_state"] == [{"shapes": {"fc.weight": [5, 10]}}]


def test_a_hub_id_opens_from_the_local_cache_and_says_how_to_fetch_it_when_missing(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    from model_opt.errors import ModelLoadError
    from model_opt.modelio import check_readable

    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert check_readable("acme/tiny", allow_folder=True) == snapshot
    with pytest.raises(ModelLoadError, match=r"acme/missing is neither a file here nor a Hugging Face model in the "
                                             r"local cache; download it first \(hf download acme/missing\)"):
        check_readable("acme/missing", allow_folder=True)
    with pytest.raises(ModelLoadError, match="model file not found: nested/dir/model.pt"):
        check_readable("nested/dir/model.pt")


def _timed(median: float, runtime: str) -> object:
    from model_opt.measure import Latency

    return Latency(median, median * 1.1, 30, runtime, 0.1, True, [median] * 4)


def test_the_headline_says_where_the_speed_came_from() -> None:
    """Over the original as run today (eager), split into the runtime's part (float compiled) and the technique's
    (both compiled); when the technique adds under 5%, the report says the gain is the runtime's and how to get it
    without the technique."""
    from model_opt.report import Measurement, Report
    from model_opt.speed_advice import speed_warnings

    def report(technique_ms: float) -> Report:
        before = Measurement({"accuracy": 0.9}, "accuracy", 10, 10, 100, _timed(10.0, "eager"))
        after = Measurement({"accuracy": 0.9}, "accuracy", 10, 10, 50, _timed(technique_ms, "compiled"))
        return Report("m.pt", "cpu", 2, True, before, after, runtime_latency=_timed(5.0, "compiled"))

    gain = report(2.5)
    assert gain.summary()["speedup"] == pytest.approx(4.0)
    assert gain.summary()["speedup_runtime"] == pytest.approx(2.0)
    assert gain.summary()["speedup_technique"] == pytest.approx(2.0)
    text = gain.render()
    assert "headline: 4.00x faster than the original as run today (eager): 2.00x from the runtime (float " \
           "compiled), 2.00x from the technique" in text
    assert "of which the runtime (eager -> float compiled)" in text and "of which the technique (compiled both)" in text
    assert not any("the runtime's" in w for w in speed_warnings(gain, []))
    runtime_only = report(4.9)
    warning = next(w for w in speed_warnings(runtime_only, []) if "the runtime's" in w)
    assert warning == ("the speed-up is the runtime's, not the technique's: float compiled runs 2.00x the original, "
                       "and the technique adds 1.02x; compile the float model (torch.compile with inductor freezing) "
                       "for the same gain without it")


def test_a_causal_lms_headline_is_its_decode_rate() -> None:
    from model_opt.report import Measurement, Report

    before = Measurement({"perplexity": 20.0, "decode_tokens_per_s": 50.0}, "perplexity", 10, 10, 100,
                         _timed(10.0, "eager"))
    after = Measurement({"perplexity": 20.2, "decode_tokens_per_s": 125.0}, "perplexity", 10, 10, 40,
                        _timed(8.0, "openvino"))
    summary = Report("lm", "cpu", 2, False, before, after).summary()
    assert summary["speedup"] == summary["decode_speedup"] == pytest.approx(2.5)
    assert summary["prefill_speedup"] == pytest.approx(1.25)
    assert summary["speedup_runtime"] is None and summary["speedup_technique"] is None  # (not timed: not said)
    assert "headline: decode 2.50x faster (50.0 -> 125.0 tokens/s, decode_tokens_per_s); prefill 1.25x faster" in \
        Report("lm", "cpu", 2, False, before, after).render()


def test_a_causal_lms_decode_speed_up_is_split_into_the_runtimes_part_and_the_techniques() -> None:
    """The float model in the result's runtime decodes in the same rounds: the summary's parts are the decode
    rate's (the headline's), the prefill's are named so; when the technique adds under 5% the warning says how to
    get the runtime's gain without it."""
    from model_opt.report import Measurement, Report
    from model_opt.speed_advice import speed_warnings

    def report(runtime_rate: float) -> Report:
        before = Measurement({"perplexity": 20.0, "decode_tokens_per_s": 50.0}, "perplexity", 10, 10, 100,
                             _timed(10.0, "eager"))
        after = Measurement({"perplexity": 20.2, "decode_tokens_per_s": 125.0}, "perplexity", 10, 10, 40,
                            _timed(8.0, "llama.cpp"))
        return Report("lm", "cpu", 2, False, before, after, runtime_latency=_timed(9.0, "llama.cpp"),
                      runtime_decode=("llama.cpp", runtime_rate))

    split = report(100.0)
    summary = split.summary()
    assert summary["speedup"] == pytest.approx(summary["speedup_runtime"] * summary["speedup_technique"])
    assert (summary["speedup_runtime"], summary["speedup_technique"]) == (pytest.approx(2.0), pytest.approx(1.25))
    assert summary["prefill_speedup_runtime"] == pytest.approx(10 / 9)
    text = split.render()
    assert ("headline: decode 2.50x faster (50.0 -> 125.0 tokens/s, decode_tokens_per_s): 2.00x from the runtime "
            "(float llama.cpp), 1.25x from the technique; prefill 1.25x faster") in text
    assert "of which the runtime (-> float llama.cpp)" in text and "of which the technique (llama.cpp both)" in text
    assert not any("the runtime's" in w for w in speed_warnings(split, []))
    warning = next(w for w in speed_warnings(report(122.0), []) if "the runtime's" in w)
    assert warning.endswith("convert the float model to llama.cpp (model-opt export MODEL --format gguf) for the "
                            "same gain without it")


def test_more_models_of_one_class_than_dynamos_limit_each_run_compiled() -> None:
    """compile_model on more models of one class than Dynamo's default recompile limit (8 graphs per code): each
    still compiles (autotune's ninth compiled candidate of a class ran eager before, silently)."""
    import torch
    from model_opt.measure import compile_model
    from torch._dynamo.utils import counters

    x = torch.randn(4, 8)
    for i in range(10):
        graphs = counters["stats"]["unique_graphs"]
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
        compiled, _ = compile_model(model, x)
        assert counters["stats"]["unique_graphs"] > graphs, f"model {i + 1} ran eager"
        with torch.inference_mode():
            assert torch.allclose(compiled(x), model(x), atol=1e-5)
