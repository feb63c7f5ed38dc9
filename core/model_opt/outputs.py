"""Where a run writes, and what it may replace: output naming (files and folders, beside the input or for a Hub
id in the working directory), the side files written beside an output, their protection (never an input, a
user's file, or a file an earlier run did not write for that output), the writability check, and the lock under
which an output and its side files are put in place together. Used alike by optimize, autotune, export and
``model_opt.save``."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .artifact.format import is_artifact, read_manifest
from .artifact.write import check_replaceable_folder
from .atomic import written_together
from .errors import ModelOptError, UsageError
from .sources import resolve_model_path

#: Suffixes of the files model-opt writes beside an artifact, or reads as other formats.
RESERVED_SUFFIXES = (".py", ".json", ".pt2", ".xml", ".bin", ".journal", ".png", ".log", ".gguf")
#: Each export format's file suffix (OpenVINO also writes the .bin beside the .xml; GGUF is a llama.cpp result's
#: own file).
EXPORT_SUFFIXES = {"pt2": ".pt2", "onnx": ".onnx", "openvino": ".xml", "gguf": ".gguf"}


def default_output(model_path: Path) -> Path:
    name = model_path.name if model_path.is_dir() else model_path.stem
    return model_path.with_name(f"{name}.optimized.pt")


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def output_target(model_path: str | os.PathLike[str], output: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Where a run writes, and whether it writes a folder: a Hugging Face folder in gives a folder out (beside it,
    ``<name>.optimized``; for a Hub id, in the working directory), as does an ``output`` that ends in '/' or is a
    folder; else a file (``output``, or ``<name>.optimized.pt`` beside the model)."""
    given = Path(model_path)
    model_path = resolve_model_path(model_path)
    if not output:
        if model_path != given:  # a Hub id: its folder in the Hugging Face cache is no place to write
            return Path.cwd() / f"{given.name}.optimized", True
        if is_hf_folder(model_path):
            return model_path.with_name(f"{model_path.name}.optimized"), True
        return default_output(model_path), False
    text = os.fspath(output)
    named = Path(text.rstrip("/" + os.sep) or os.sep)
    if named.name in ("", ".", "..") or named.resolve().name == "":
        raise UsageError(f"--output {text} names a folder by a path with no name of its own (the working "
                         "directory, its parent, or the root)", "pass a new file or folder, e.g. --output out.pt "
                         "or --output out/")
    try:
        folder = Path(text).is_dir()
    except OSError:  # a name too long to look up: check_output says so
        folder = False
    return Path(text.rstrip("/" + os.sep) or text), folder or text.endswith(("/", os.sep))


def side_path(output: Path, suffix: str, folder: bool = False) -> Path:
    """A file beside the output, named after it: ``model.optimized.pt`` -> ``model.optimized.report.json``; a
    folder output ``model.optimized/`` -> ``model.optimized.report.json`` beside it."""
    return output.with_name(f"{output.name if folder else output.stem}{suffix}")


def report_path(output: Path, folder: bool = False) -> Path:
    """The report of a run, beside its output under the output's own name."""
    return side_path(output, ".report.json", folder)


def side_files(output: Path, folder: bool = False) -> list[Path]:
    """Every file a run may write beside its output: report, backend log, torch.export program, autotune plot,
    and for a file output the runtime's own files (OpenVINO IR, GGUF; a folder output holds them inside). Each is
    checked like the output itself before any work."""
    files = [side_path(output, suffix, folder) for suffix in (".report.json", ".log", ".pt2", ".pareto.png")]
    return files if folder else [*files, *(output.with_suffix(s) for s in (".xml", ".bin", ".gguf"))]


def inputs_of(path: Path) -> list[Path]:
    """A model path and the files that belong to it (an OpenVINO IR's weights)."""
    return [path, *([path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [])]


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def owned_files(out: Path) -> set[str]:
    """Names of the side files an existing model-opt artifact at ``out`` says it wrote (replaceable by a rerun)."""
    if not is_artifact(out):
        return set()
    try:
        files = read_manifest(out).get("files", [])
    except ModelOptError:
        return set()
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def check_writable_folder(folder: Path, flag: str = "--output") -> None:
    """Fail before any work when the output cannot be written (the nearest existing folder is checked)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} folder {folder} cannot be made: {existing} is not a folder",
                         f"choose a {flag} in a folder you can write")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} folder {existing} is not writable ({exc.strerror or exc})",
                         f"choose a {flag} in a folder you can write") from None


def check_output(out: Path, protected: Sequence[Path], flag: str = "--output", folder: bool = False) -> Path:
    """Refuse an output that would replace the user's files: the input, the test script, the data, an
    unrelated existing file or folder; or whose side files (report, log, IR, export, plot) would replace any of
    them. A ``folder`` output may be new, empty, or a folder an earlier run wrote, and holds no input."""
    if len(out.name.encode()) > 200:  # before touching the file system, which refuses such names
        raise UsageError(f"{flag} name {out.name[:40]}... is {len(out.name.encode())} bytes long, too long for the "
                         "files written beside it", f"choose a shorter {flag} name")
    if folder:
        check_output_folder(out, protected, flag)
    elif out.is_dir():
        raise UsageError(f"{flag} {out} is a folder", f"pass a file path, e.g. {flag} {out / 'model.optimized.pt'}")
    folders = [p.resolve() for p in protected if p.is_dir()]
    owned = owned_files(out)
    for path in [out, *side_files(out, folder)]:
        target = path.resolve()
        holder = next((p for p in folders if p in target.parents or p == target), None)
        if holder is not None:
            raise UsageError(f"{flag} {out} is inside {holder.name}/, an input folder",
                             f"choose a {flag} outside the model and dataset folders")
        if any(_same(path, p) for p in protected):
            what = "output" if path == out else f"file {path.name} (written beside the output)"
            raise UsageError(f"{flag} {out} would overwrite {path.name} with the {what}",
                             f"choose another {flag} path; model-opt never replaces its inputs")
        if path != out and (path.exists() or path.is_symlink()) and path.name not in owned:
            raise UsageError(f"{flag} {out} would replace {path.name} beside it, which model-opt did not write for "
                             "this output", f"choose another {flag} path, or move {path.name} away yourself")
    if folder:
        check_writable_folder(out.parent, flag)
        return out
    if out.suffix.lower() in RESERVED_SUFFIXES:
        raise UsageError(f"{flag} {out.name} ends in {out.suffix}, which model-opt uses for other files",
                         f"name the optimized model with .pt, e.g. {flag} {out.with_suffix('.pt')}")
    if (out.exists() or out.is_symlink()) and not (out.is_file() and not out.is_symlink() and is_artifact(out)):
        raise UsageError(f"{flag} {out} exists and is not a model-opt artifact",
                         "choose another path, or remove the file yourself")
    check_writable_folder(out.parent, flag)
    return out


def check_output_folder(out: Path, protected: Sequence[Path], flag: str) -> None:
    """A folder output is replaced whole: it must not hold (or be) an input, nor another folder of the user's."""
    target = out.resolve()
    for path in protected:
        if path.resolve() == target or target in path.resolve().parents:
            raise UsageError(f"{flag} {out} holds {path.name}, an input, and the output folder is replaced whole",
                             f"choose a new {flag} folder")
    try:
        check_replaceable_folder(out)
    except UsageError as exc:
        raise UsageError(f"{flag} {exc.problem}", exc.fix) from None


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock while a run writes its output and side files, so that two runs writing the
    same output one after the other leave a consistent set; the files are put in place together at the end."""
    out.parent.mkdir(parents=True, exist_ok=True)
    locks = Path(tempfile.gettempdir()) / "model-opt-locks"  # never in the user's folder (a SIGKILL leaves it)
    locks.mkdir(exist_ok=True)
    key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:32]
    lock_path = locks / f"{key}.lock"
    while True:
        handle = open(lock_path, "a+")  # noqa: SIM115
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            same = os.path.exists(lock_path) and os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except OSError:
            same = False
        if same:
            break
        handle.close()  # another run removed the file we locked: lock the new one
    try:
        with written_together():  # the output and its side files appear together, or none of them
            yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        handle.close()


def export_target(model_path: Path, fmt: str, output: str | None) -> Path:
    """Where ``model-opt export`` writes: ``output`` (a folder: the model's name in it), else beside the model,
    named after it with the format's suffix."""
    name = f"{model_path.stem if model_path.is_file() else model_path.name}{EXPORT_SUFFIXES[fmt]}"
    if not output:
        return model_path.with_name(name)
    out = Path(output)
    return out / name if output.endswith(("/", os.sep)) or out.is_dir() else out


def check_export_output(out: Path, model_path: Path, fmt: str) -> Path:
    """An export never replaces the model, its files, or any existing file, and is named with its format's
    suffix; checked, with the folder's writability, before any work."""
    suffix = EXPORT_SUFFIXES[fmt]
    if out.suffix != suffix:
        raise UsageError(f"--output {out.name} does not end in the {fmt} suffix",
                         f"name it like {out.with_suffix(suffix)}")
    for target in [out, *([out.with_suffix(".bin")] if fmt == "openvino" else [])]:
        if model_path.resolve() in target.resolve().parents or any(_same(target, p) for p in inputs_of(model_path)):
            raise UsageError(f"--output {out} would overwrite {target.name}, an input", "choose another --output")
        if target.exists() or target.is_symlink():
            raise UsageError(f"{target} already exists", "choose another --output, or remove the file yourself")
    check_writable_folder(out.parent)
    return out


#: What a sensitivity measurement writes: its JSON (which says it is one) and the chart beside it.
SENSITIVITY_FORMAT = "model-opt-sensitivity"


def sensitivity_target(model_path: Path, output: str | None) -> Path:
    """Where ``model-opt sensitivity`` writes its JSON: ``output``, else ``<model>.sensitivity.json`` beside the
    model (the chart beside it, ``.png``)."""
    if output:
        return Path(output)
    name = model_path.name if model_path.is_dir() else model_path.stem
    return model_path.with_name(f"{name}.sensitivity.json")


def check_sensitivity_output(out: Path, protected: Sequence[Path]) -> Path:
    """The JSON (named ``.json``) and its chart (``.png``) may not be an input or a user's file: each may replace
    only what an earlier sensitivity measurement wrote there."""
    import json

    if out.suffix != ".json":
        raise UsageError(f"--output {out.name} does not end in .json", f"name it like {out.with_suffix('.json')}")
    owned: list[str] = []
    if out.exists() or out.is_symlink():
        try:
            earlier = json.loads(out.read_text()) if out.is_file() and not out.is_symlink() else None
        except (OSError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and earlier.get("format") == SENSITIVITY_FORMAT):
            raise UsageError(f"--output {out} exists and is not a sensitivity measurement of model-opt's",
                             "choose another --output, or remove the file yourself")
        owned = [f for f in earlier.get("files", []) if isinstance(f, str)]
    for path in (out, out.with_suffix(".png")):
        if any(_same(path, p) for p in protected) or any(p.is_dir() and p.resolve() in path.resolve().parents
                                                          for p in protected):
            raise UsageError(f"--output {out} would write {path.name} over or inside an input",
                             "choose an --output outside the model and dataset")
    chart = out.with_suffix(".png")
    if (chart.exists() or chart.is_symlink()) and chart.name not in owned:
        raise UsageError(f"--output {out} would replace {chart.name} beside it, which model-opt did not write for "
                         "this output", f"choose another --output, or move {chart.name} away yourself")
    check_writable_folder(out.parent)
    return out
