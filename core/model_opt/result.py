"""What a technique hook returns: the new model, a report mapping, and the state that replays it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TechniqueResult:
    """The result of ``quantize``/``prune``/``fuse``/``decompose``.

    ``info`` is a JSON-serializable mapping for the report; the core reads three keys of it:
    ``changed`` (``False`` when the technique found nothing to do), ``note`` (why, in plain words) and
    ``warning`` (shown in the report's warnings). ``state`` is the JSON-serializable state that the
    plugin's ``restore`` hook needs to rebuild this step on a fresh copy of the original architecture
    (chosen ranks, pruned shapes, patch settings); artifacts of steps whose plugin implements
    ``restore`` reopen without unpickling anything; ``state=None`` says this result cannot be replayed
    (it is then saved as a pickled model, which reopens only when trusted). A plain ``(model, info)``
    tuple is accepted too, with an empty state.
    """

    model: Any
    info: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] | None = field(default_factory=dict)
    #: The result's weights hold the whole model (OpenVINO IR, a torch.export program), so reopening
    #: it needs no original architecture: ``restore`` then gets ``model=None``.
    standalone: bool = False

    @classmethod
    def coerce(cls, value: Any) -> TechniqueResult | None:
        """A TechniqueResult from a hook's return value, or None when it is neither form."""
        if isinstance(value, cls):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            return cls(value[0], dict(value[1] or {}))
        return None
