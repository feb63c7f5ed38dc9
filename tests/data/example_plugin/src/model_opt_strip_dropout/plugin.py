"""Replace every Dropout by Identity: identical outputs in eval mode, fewer modules to run."""

from model_opt.hookspecs import hookimpl
from model_opt.registry import Option, Technique

STRIP = Technique(
    kind="fuse",
    backend="example",
    method="strip_dropout",
    summary="Replace Dropout layers by Identity (inference only).",
    options=(Option("keep", list, [], "module names to keep"),),
    speeds_up=(),
    speed_note="Dropout is already a no-op in eval mode",
)


@hookimpl
def register_techniques(register):
    register(STRIP)


@hookimpl
def fuse(model, technique, options, context):
    import torch  # heavy imports go inside the hook, never at module level

    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Dropout) and full not in options["keep"]:
                setattr(module, child_name, torch.nn.Identity())
                replaced.append(full)
    return model, {"replaced": replaced}
