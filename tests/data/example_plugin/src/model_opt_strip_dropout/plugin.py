"""Replace every Dropout by Identity: identical outputs in eval mode, fewer modules to run."""

from model_opt.hookspecs import hookimpl
from model_opt.registry import Option, Technique
from model_opt.result import TechniqueResult

STRIP = Technique(
    kind="fuse",
    backend="example",
    method="strip_dropout",
    summary="Replace Dropout layers by Identity (inference only).",
    options=(Option("exclude", list, [], "module names (or prefixes) to keep"),
             # a kind-level flag of its own: --fuse-min-p appears in `model-opt optimize --help`
             Option("min_p", float, 0.0, "strip only Dropout layers with p at least this", minimum=0.0,
                    flag="--fuse-min-p")),
    speeds_up=(),
    speed_note="Dropout is already a no-op in eval mode",
)


@hookimpl
def register_techniques(register):
    register(STRIP)


def strip(model, names):
    import torch  # heavy imports go inside the hooks, never at module level
    from model_opt.modules import set_module

    for name in names:
        set_module(model, name, torch.nn.Identity())
    return model


@hookimpl
def fuse(model, technique, options, context):
    import torch
    from model_opt.modules import excluded

    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Dropout) and module.p >= options["min_p"]
             and not excluded(name, options["exclude"])]
    return TechniqueResult(strip(model, names), info={"replaced": names}, state={"replaced": names})


@hookimpl
def restore(model, technique, options, state, context):
    # Rebuild the result on a fresh copy of the original architecture; the weights are loaded after.
    return strip(model, state["replaced"])
