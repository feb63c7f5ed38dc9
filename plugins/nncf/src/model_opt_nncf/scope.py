"""The one translation of model-opt's ``exclude`` option (module names, or prefixes of them) into NNCF's
IgnoredScope, for each graph NNCF sees."""

from __future__ import annotations

import re
from typing import Any


def ignored_scope(names: list[str], prefix: str = "", openvino: bool = False) -> Any:
    """NNCF's IgnoredScope that keeps the modules ``names`` in float (None when there are none), each name taken
    under ``prefix`` (the path of the wrapper NNCF sees the model in). In a model converted to OpenVINO a module's
    ops are named ``__module.<path>/aten::...``; in a torch model NNCF names an op ``<path with />/<fn>/<n>`` and a
    weight ``<path>.weight``."""
    import nncf

    if not names:
        return None
    paths = [f"{prefix}{name}" for name in names]
    if openvino:
        patterns = [rf"^__module\.{re.escape(path)}(\.|/).*" for path in paths]
    else:
        patterns = [rf"^{re.escape(path.replace('.', '/'))}(\.|/).*" for path in paths]
        patterns += [rf"^{re.escape(path)}(\.|/|$).*" for path in paths]
    return nncf.IgnoredScope(patterns=patterns, validate=False)
