"""The ``model-opt`` Typer app. Commands import torch and backends only inside their bodies."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from model_opt.errors import AccuracyBudgetExceeded, ModelOptError, UsageError
from model_opt.version import __version__

from model_opt_cli.flags import (
    KIND_FLAGS,
    build_steps,
    command_flags,
    option_usage,
    with_technique_flags,
    without_technique_flags,
)

#: Options several commands share, declared once.
DeviceOption = Annotated[str, typer.Option(help="cpu or cuda.")]
InputShapeOption = Annotated[str | None, typer.Option(help="Random example input, e.g. 1,3,224,224.")]
TrustModelOption = Annotated[bool, typer.Option("--trust-model", help="Allow a pickled nn.Module.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress messages.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Show backends' own output.")]

app = typer.Typer(
    name="model-opt",
    help="Make trained PyTorch models smaller and faster, and prove it: metric, latency and size before "
    "and after, on your own test script.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def log_path_for(model: Path, output: str | None) -> Path:
    """Where backend messages of a run go: beside its output, under the output's name."""
    from model_opt.outputs import output_target, side_path

    out, folder = output_target(model, output)
    return side_path(out, ".log", folder)


@contextlib.contextmanager
def console(log_path: Path, quiet: bool, verbose: bool) -> Any:
    """Yield the progress callback; backend warnings, logs and progress bars go to ``log_path`` (said at
    the end) unless --verbose; --quiet silences model-opt's own progress too."""
    from model_opt.backend_output import backend_output, stdout_fd_to

    from model_opt_cli.progress import progress_display

    terminal: list[Any] = [sys.stderr]
    with progress_display(sys.stderr, quiet, terminal=False if verbose else None) as progress:
        if verbose:  # backends may print, even to fd 1 directly; the report alone goes to stdout
            with contextlib.redirect_stdout(sys.stderr), stdout_fd_to(2):
                yield progress
            return
        with backend_output(log_path, terminal) as written:
            yield progress
        if written:  # (an empty log, or a lone newline, says nothing and is not written)
            progress(f"backend messages (warnings, logs, progress bars): {written[0]}")


def interrupted(interrupt: KeyboardInterrupt) -> typer.Exit:
    """Ctrl-C or SIGTERM: say truthfully whether the output was written (it is, whole, or not at all)."""
    from model_opt.atomic import InterruptedAfterSave

    if isinstance(interrupt, InterruptedAfterSave):
        typer.echo(f"Interrupted after the output was written: {', '.join(map(str, interrupt.written))}", err=True)
    else:
        typer.echo("Interrupted: nothing was written.", err=True)
    return typer.Exit(130)


def fail(err: ModelOptError) -> typer.Exit:
    """Print the one-line error (secrets such as a storage URL's password hidden) and exit with its code."""
    from model_opt.redaction import redact

    typer.echo(f"Error: {redact(err)}", err=True)
    return typer.Exit(err.exit_code)


def parse_shape(text: str | None) -> list[int] | None:
    if not text:
        return None
    parts = re.split(r"[,x]", text.strip().strip(","))
    try:
        shape = [int(part) for part in parts]
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of integers", "write it like 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r} has no positive dimensions", "write it like 1,3,224,224")
    return shape


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(help="Model file or folder: a state_dict (with load_model in the "
                                                "test script), a Hugging Face folder, a model-opt output, a "
                                                ".pt2 program, TorchScript, an OpenVINO IR .xml, or a pickled "
                                                "module (with --trust-model).")],
    test_dataset: Annotated[Path, typer.Option("--test-dataset", help="Dataset path passed to the test script.")],
    test_script: Annotated[Path | None, typer.Option("--test-script", help="eval.py: defines evaluate(model, "
                                                                           "dataset_path), or prints 'name = "
                                                                           "number'. Optional for causal LMs "
                                                                           "(built-in perplexity and tokens/s on "
                                                                           "a folder of .txt files).")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Where to write the optimized model "
                                                                     "(default: beside the input; a path ending "
                                                                     "in / is a folder).")] = None,
    device: DeviceOption = "cpu",
    max_accuracy_drop: Annotated[float | None, typer.Option(help="Fail, writing nothing, if the primary "
                                                                 "metric drops more than this.")] = None,
    input_shape: Annotated[str | None, typer.Option(help="Random example input for latency, e.g. "
                                                         "1,3,224,224 (when the script has no "
                                                         "example_input).")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="Time the optimized model under torch.compile "
                                                             "with freezing (how int8 gets fast on CPU).")] = False,
    finetune_steps: Annotated[int, typer.Option(help="Recovery fine-tuning steps with the test script's "
                                                     "train(model, dataset_path, steps).")] = 0,
    export: Annotated[bool, typer.Option("--export", help="Also write a torch.export .pt2 beside the output "
                                                          "(loads with no trust flag).")] = False,
    trust_model: Annotated[bool, typer.Option("--trust-model", help="Allow loading a pickled nn.Module "
                                                                    "(runs code from the file).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    quiet: QuietOption = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show backends' own warnings, logs and "
                                                                  "progress bars (else: a .log beside the "
                                                                  "output).")] = False,
    **technique_flags: Any,
) -> None:
    """Apply techniques (in the order prune, decompose, fuse, quantize) and report before/after.

    MODEL is a model file or a folder: a Hugging Face folder gives a Hugging Face folder out."""
    from model_opt.pipeline import optimize as run
    from model_opt.plugins import get_plugin_manager

    try:
        steps = build_steps(technique_flags, get_plugin_manager().registry)
        with console(log_path_for(model, output), quiet, verbose) as progress:
            report = run(model, test_script=test_script, dataset=test_dataset, steps=steps, output=output,
                         device=device, max_accuracy_drop=max_accuracy_drop, trust_model=trust_model,
                         input_shape=parse_shape(input_shape), finetune_steps=finetune_steps, export=export,
                         compile=compile_, progress=progress)
    except AccuracyBudgetExceeded as err:
        if err.report is not None:
            typer.echo(err.report.to_json() if as_json else err.report.render())
        raise fail(err) from None
    except ModelOptError as err:
        raise fail(err) from None
    except KeyboardInterrupt as interrupt:
        raise interrupted(interrupt) from None
    typer.echo(report.to_json() if as_json else report.render())


without_technique_flags(optimize)


@app.command("sensitivity")
def sensitivity_command(
    model: Annotated[Path, typer.Argument(help="Model file or folder (as for optimize).")],
    test_dataset: Annotated[Path, typer.Option("--test-dataset", help="Dataset path passed to the test script.")],
    test_script: Annotated[Path | None, typer.Option("--test-script", help="The test script (see optimize; "
                                                                           "optional for causal LMs).")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Where to write the JSON (default: "
                                                                     "<model>.sensitivity.json beside it); the "
                                                                     "chart goes beside it (.png).")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(help="The budget, drawn on the chart.")] = None,
    eval_fraction: Annotated[float | None, typer.Option(help="Evaluate on this share of the data (a test script "
                                                             "whose evaluate() takes 'fraction'; the built-in LM "
                                                             "evaluation).")] = None,
    refine: Annotated[int, typer.Option(help="Measure the N most costly groups again, layer by layer.")] = 0,
    device: DeviceOption = "cpu",
    input_shape: InputShapeOption = None,
    trust_model: TrustModelOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the measurement as JSON on stdout.")] = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    **technique_flags: Any,
) -> None:
    """Which layers cost accuracy: apply ONE technique (its usual flags) to one group of layers at a time (a
    transformer block, a conv stage, the embedding, the head) and rank the groups by the drop of your metric."""
    from model_opt.plugins import get_plugin_manager
    from model_opt.redaction import redact
    from model_opt.sensitivity import sensitivity

    try:
        steps = build_steps(technique_flags, get_plugin_manager().registry)
        if len(steps) != 1:
            raise UsageError(f"sensitivity measures one technique, and {len(steps) or 'no'} were asked for",
                             "pass the flags of one technique, e.g. --quantize --quant-method int8_static")
        log = Path(output or model).with_suffix(".log") if output else model.with_name(f"{model.stem}.sensitivity.log")
        with console(log, quiet, verbose) as progress:
            result = sensitivity(model, test_script=test_script, dataset=test_dataset, step=steps[0], output=output,
                                 max_accuracy_drop=max_accuracy_drop, eval_fraction=eval_fraction, refine=refine,
                                 device=device, trust_model=trust_model, input_shape=parse_shape(input_shape),
                                 progress=progress)
    except ModelOptError as err:
        raise fail(err) from None
    except KeyboardInterrupt as interrupt:
        raise interrupted(interrupt) from None
    typer.echo(redact(json.dumps(result.to_dict(), indent=2) if as_json else result.render()))


without_technique_flags(sensitivity_command)


@app.command()
def plugins(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List installed plugins: version, techniques, status and install hints."""
    from model_opt.plugins import get_plugin_manager

    records = list(get_plugin_manager().records.values())
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records], indent=2))
        return
    for record in records:
        version = record.version or "?"
        techniques = ", ".join(f"{t.kind}:{t.backend}:{t.method}" for t in record.techniques) or "(none)"
        typer.echo(f"{record.name} {version} [{record.status}]  {record.distribution or record.module}")
        typer.echo(f"    techniques: {techniques}")
        if record.reason:
            typer.echo(f"    reason: {record.reason}")
        if record.hint:
            typer.echo(f"    fix: {record.hint}")


@app.command()
def techniques(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List every technique with its options, defaults, needs and devices."""
    from model_opt.plugins import get_plugin_manager

    registry = get_plugin_manager().registry
    order = list(KIND_FLAGS)
    items = sorted(registry.techniques.values(), key=lambda t: (order.index(t.kind), t.backend, t.method))
    if as_json:
        typer.echo(json.dumps([t.to_dict() for t in items], indent=2, default=str))
        return
    for t in items:
        typer.echo(f"{t.kind} {t.backend}:{t.method}  (plugin {t.plugin})")
        typer.echo(f"    {t.summary}")
        for o in t.options:
            facts = [f"default {o.default!r}"]
            facts += [f"choices: {', '.join(map(str, o.choices))}"] if o.choices else []
            facts += [f"range: {o.describe_range()}"] if o.describe_range() else []
            typer.echo(f"    {option_usage(t.kind, o)}: {o.help.rstrip('.') or o.name} ({'; '.join(facts)})")
        typer.echo(f"    needs: {', '.join(t.needs) or 'nothing'}; requires: {', '.join(t.requires) or '-'}")
        places = [", ".join(t.speeds_up)] if t.speeds_up else []
        places += [f"{', '.join(devices)} with {name}={value}" for name, values in t.speeds_up_with.items()
                   for value, devices in values.items()]
        typer.echo(f"    speeds up on: {'; '.join(places) or 'no device'}"
                   + (f" ({t.speed_note})" if t.speed_note else ""))
    for key, names in registry.conflicts.items():
        typer.echo(f"conflict: {key[1]}:{key[2]} is registered by {' and '.join(names)}")


@app.command()
def demo(
    folder: Annotated[Path, typer.Option(help="Where to write the example.")] = Path("model-opt-demo"),
    epochs: Annotated[int, typer.Option(help="Training epochs for the example model.")] = 12,
) -> None:
    """Train the shipped digits example, recommend techniques for it, and apply the first recommended one
    that is installed and speeds the model up on this CPU, printing the before/after report."""
    from model_opt.examples.digits import check_demo_folder, prepare
    from model_opt.pipeline import optimize as run
    from model_opt.recommend import first_fast_here
    from model_opt.steps import Step

    progress = lambda message: typer.echo(f"model-opt: {message}", err=True)  # noqa: E731
    try:
        check_demo_folder(folder)
        progress(f"training the digits example in {folder}")
        example = prepare(folder, epochs=epochs)
        chosen = first_fast_here(print_recommendation(example.model, example.script, str(example.dataset), "cpu",
                                                      False))
        if chosen is None:
            raise ModelOptError("no installed technique applies to the example", 'pip install "model-opt[all]"')
        technique = chosen.technique
        step = Step(technique.kind, technique.backend, technique.method, dict(chosen.options))
        flags = command_flags(technique, chosen.options)
        progress(f"running: model-opt optimize {example.model} --test-dataset {example.dataset} --test-script "
            f"{example.script} {flags}")
        with console(log_path_for(example.model, None), False, False) as progress:
            report = run(example.model, test_script=example.script, dataset=example.dataset, steps=[step],
                         progress=progress)
    except ModelOptError as err:
        raise fail(err) from None
    typer.echo(report.render())


def print_recommendation(model: Path, test_script: Path | None, test_dataset: str, device: str,
                         trust_model: bool) -> list[Any]:
    """Print the model's family and the recommendations for it (with the command for each); return them."""
    from model_opt.device import device_profile
    from model_opt.modelio import open_model
    from model_opt.recommend import RUNTIME_FORMAT, recommend, runtime_command, runtime_instead
    from model_opt.testscript import TestScript

    loaded = open_model(model, TestScript(test_script, model_path=model) if test_script else None, trust_model)
    family, evidence, recommendations = recommend(loaded, device)
    typer.echo(f"{model}: {family} ({evidence})")
    typer.echo(f"device: {device} — {device_profile().describe(device)}")
    # a causal LM without a test script gets the built-in evaluation
    script_arg = f" --test-script {test_script or 'eval.py'}" if test_script or family != "causal-lm" else ""
    runtime = runtime_instead(family, recommendations, device)
    if runtime:
        typer.echo(f"- runtime {RUNTIME_FORMAT} (float): {runtime}")
        typer.echo(f"    {runtime_command(model, RUNTIME_FORMAT, test_dataset, script_arg)}")
    for recommended in recommendations:
        technique = recommended.technique
        line = f"- {technique.kind} {technique.backend}:{technique.method}: {recommended.why}"
        if recommended.available:
            typer.echo(f"{line} [{recommended.slow}]" if recommended.slow else line)
            compiled = technique.fast_only_compiled(device.split(":")[0], recommended.options)
            typer.echo(f"    model-opt optimize {model} --test-dataset {test_dataset}{script_arg} "
                       f"{command_flags(technique, recommended.options)}{' --compile' if compiled else ''}")
        else:
            typer.echo(f"{line} [{recommended.missing}]")
    typer.echo(f"Search them together, within an accuracy budget: model-opt autotune {model} --test-dataset "
               f"{test_dataset}{script_arg} --max-accuracy-drop 0.01")
    return recommendations


@app.command("recommend")
def recommend_command(
    model: Annotated[Path, typer.Argument(help="Model file (as for optimize).")],
    test_script: Annotated[Path | None, typer.Option("--test-script", help="Test script whose load_model "
                                                                           "builds the model.")] = None,
    test_dataset: Annotated[str, typer.Option("--test-dataset", help="Dataset path for the printed "
                                                                     "commands.")] = "data/",
    device: DeviceOption = "cpu",
    trust_model: TrustModelOption = False,
) -> None:
    """Detect the architecture family and print the techniques that fit it, with the command for each."""
    from model_opt.job import check_device

    try:
        check_device(device)
        print_recommendation(model, test_script, test_dataset, device, trust_model)
    except ModelOptError as err:
        raise fail(err) from None


@app.command("autotune")
def autotune_command(
    model: Annotated[Path, typer.Argument(help="Model file (as for optimize).")],
    test_dataset: Annotated[Path, typer.Option("--test-dataset", help="Dataset path passed to the test script.")],
    max_accuracy_drop: Annotated[float, typer.Option(help="Largest metric drop accepted, in metric units.")],
    test_script: Annotated[Path | None, typer.Option("--test-script", help="The test script (see optimize; "
                                                                           "optional for causal LMs).")] = None,
    trials: Annotated[int, typer.Option(help="Trials in the study (all workers together).")] = 20,
    timeout: Annotated[float | None, typer.Option(help="Stop this worker after this many seconds.")] = None,
    objective: Annotated[str, typer.Option(help="latency, size, both, or tokens-per-second (a causal LM's decode "
                                                "speed, from the built-in evaluation).")] = "latency",
    study: Annotated[str | None, typer.Option(help="Study name (workers sharing it cooperate).")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (postgresql://..., sqlite:///...) "
                                                     "or journal file; default: a journal beside the "
                                                     "output.")] = None,
    backends: Annotated[str | None, typer.Option(help="Only search these backends (comma list).")] = None,
    recovery_steps: Annotated[int, typer.Option(help="Recovery fine-tuning steps the search may add after pruning "
                                                     "(with the test script's train(); 0: never).")] = 100,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for other workers' running trials "
                                                          "once this worker's share is done.")] = False,
    include_slow: Annotated[bool, typer.Option("--include-slow", help="Also search techniques declared slow on this "
                                                                      "device (e.g. int8 matmuls on a CPU without "
                                                                      "int8 dot products).")] = False,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Where to save the best model (a path "
                                                                     "ending in / is a folder).")] = None,
    device: DeviceOption = "cpu",
    input_shape: InputShapeOption = None,
    trust_model: TrustModelOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Search combinations of the installed techniques within an accuracy budget (Optuna)."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise fail(ModelOptError("autotune needs optuna and matplotlib", 'pip install "model-opt[autotune]"')) \
            from None
    from model_opt.autotune import autotune

    try:
        with console(log_path_for(model, output), quiet, verbose) as progress:
            result = autotune(model, test_script=test_script, dataset=test_dataset,
                              max_accuracy_drop=max_accuracy_drop, trials=trials, timeout=timeout,
                              objective=objective, study=study, storage=storage, output=output, device=device,
                              trust_model=trust_model, input_shape=parse_shape(input_shape),
                              backends=[b.strip() for b in backends.split(",")] if backends else None,
                              recovery_steps=recovery_steps, wait=not no_wait, include_slow=include_slow,
                              progress=progress)
    except AccuracyBudgetExceeded as err:
        if err.report is not None:
            typer.echo(json.dumps(err.report.to_dict(), default=str) if as_json else err.report.render())
        raise fail(err) from None
    except ModelOptError as err:
        raise fail(err) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted: finished trials are kept in the study; run the same command to resume.",
                   err=True)
        raise typer.Exit(130) from None
    from model_opt.redaction import redact

    typer.echo(redact(json.dumps(result.to_dict(), indent=2, default=str) if as_json else result.render()))


@app.command("export")
def export_command(
    model: Annotated[Path, typer.Argument(help="Model file or folder (as for optimize; model-opt's own outputs "
                                                "too).")],
    format_: Annotated[str, typer.Option("--format", "-f", help="pt2, onnx, openvino, or gguf (a causal LM for "
                                                                 "llama.cpp, with its plugin).")],
    test_script: Annotated[Path | None, typer.Option("--test-script", help="Test script: its load_model builds "
                                                                           "the model, its example_input gives "
                                                                           "the input.")] = None,
    test_dataset: Annotated[str | None, typer.Option("--test-dataset", help="Dataset path for "
                                                                            "example_input().")] = None,
    input_shape: Annotated[str | None, typer.Option(help="Random example input, e.g. 1,3,224,224 (without "
                                                         "example_input).")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Where to write (default: beside the "
                                                                     "model, with the format's suffix).")] = None,
    static_shapes: Annotated[bool, typer.Option("--static-shapes", help="Fix every shape to the example's "
                                                                        "(default: dynamic batch, and sequence "
                                                                        "for token inputs).")] = False,
    trust_model: TrustModelOption = False,
    report: Annotated[bool, typer.Option("--report", help="Also evaluate the export in its runtime with the test "
                                                          "script's metric and time it against the original, each "
                                                          "alone (openvino); the report is written beside it.")
                      ] = False,
    max_accuracy_drop: Annotated[float | None, typer.Option(help="With --report: write nothing if the primary "
                                                                 "metric drops more than this.")] = None,
) -> None:
    """Export a model as a torch.export program, ONNX or OpenVINO IR, checked against torch at two batch sizes."""
    from model_opt.export import export_file
    from model_opt.export_report import export_with_report

    measured = None
    try:
        with console(model, quiet=False, verbose=True) as progress:  # backends' messages to stderr, no log file
            if report:
                result, measured = export_with_report(
                    model, format_, output=output, test_script=test_script, dataset=test_dataset,
                    input_shape=parse_shape(input_shape), static=static_shapes, trust_model=trust_model,
                    max_accuracy_drop=max_accuracy_drop, progress=progress)
            else:
                if max_accuracy_drop is not None:
                    raise UsageError("--max-accuracy-drop applies to a measured export",
                                     "add --report (with --test-script and --test-dataset), or leave it out")
                result = export_file(model, format_, output=output, test_script=test_script, dataset=test_dataset,
                                     input_shape=parse_shape(input_shape), static=static_shapes,
                                     trust_model=trust_model, progress=progress)
    except AccuracyBudgetExceeded as err:
        if err.report is not None:
            typer.echo(err.report.render())
        raise fail(err) from None
    except ModelOptError as err:
        raise fail(err) from None
    except KeyboardInterrupt as interrupt:
        raise interrupted(interrupt) from None
    typer.echo(result.render())
    if measured is not None:
        typer.echo(measured.render())


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"model-opt {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """model-opt: quantization, pruning, token merging, fusion and decomposition, measured."""


def handle_sigterm() -> None:
    """SIGTERM (kill) interrupts like Ctrl-C, so that partly written temporary files are removed."""
    import signal

    def terminated(*_: Any) -> None:  # (the signal number and frame)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)


def with_plugins(manager: Any = None) -> typer.Typer:
    """The app with the installed techniques' flags on ``optimize`` and the plugins' own commands."""
    from model_opt.plugins import get_plugin_manager

    manager = manager or get_plugin_manager()
    with_technique_flags(optimize, manager.registry)
    with_technique_flags(sensitivity_command, manager.registry)
    if manager not in _commands_from:  # once per plugin manager
        _commands_from.append(manager)
        manager.register_commands(app)
    return app


_commands_from: list[Any] = []


def main() -> None:
    """Console entry point: plugin flags and commands are added, then the app runs."""
    from model_opt.backend_output import stdout_fd_to
    from model_opt.plugins import get_plugin_manager
    from typer._click import exceptions as click_errors  # typer's own copy of Click

    handle_sigterm()
    # a plugin's print() at import or in register_commands must not reach --json output
    with contextlib.redirect_stdout(sys.stderr), stdout_fd_to(2):
        with_plugins(get_plugin_manager())
    command = typer.main.get_command(app)
    plain_flags(command)
    try:
        code = command.main(standalone_mode=False, prog_name="model-opt")
    except KeyboardInterrupt as interrupt:
        sys.exit(interrupted(interrupt).exit_code)
    except click_errors.NoArgsIsHelpError as err:
        err.show()
        sys.exit(err.exit_code)
    except click_errors.ClickException as err:  # usage errors: one line, like every other error
        sys.exit(usage_line(err))
    sys.exit(code if isinstance(code, int) else 0)


def plain_flags(command: Any) -> None:
    """On/off flags (--prune, --help, ...) take no value: show none in help, for every command."""
    for param in getattr(command, "params", []):
        if getattr(param, "is_flag", False):
            param.metavar = ""
    original = command.get_help_option

    def get_help_option(ctx: Any) -> Any:  # --help is made per call
        option = original(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option
    for sub in getattr(command, "commands", {}).values():
        plain_flags(sub)


def usage_line(err: Any) -> int:
    """Print a Click usage error as one line naming the problem and where to look; return its exit code."""
    problem = " ".join(err.format_message().split()).rstrip(".")
    context = getattr(err, "ctx", None)
    where = f"{context.command_path} --help" if context is not None else "model-opt --help"
    typer.echo(f"Error: {problem}; see {where}", err=True)
    return err.exit_code


if __name__ == "__main__":
    main()
