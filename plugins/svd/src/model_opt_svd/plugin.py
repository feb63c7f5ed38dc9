"""Hook implementations of the svd plugin.

Its techniques arrive with issue #7; until then it registers none (it never registers a
technique that does not work).
"""

from __future__ import annotations

from typing import Any

from model_opt.hookspecs import hookimpl


@hookimpl
def register_techniques(register: Any) -> None:
    """Nothing yet: see issue #7."""
