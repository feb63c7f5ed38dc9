"""The usage telemetry of the backends model-opt drives is off.

OpenVINO and NNCF, used as libraries, send usage events to Google Analytics unless the user opted out with
``opt_in_out --opt_out`` (``openvino_telemetry``: no consent file counts as consent when no dialog is shown).
Their sender runs in a background thread and starts a ``multiprocessing.Process`` for each message: a process
forked from a thread other than the main one, which on Python 3.11 dies with "Fatal Python error: init_threadstate:
thread state already initialized" (printed into the run's output while NNCF calibrates and evaluates). model-opt
sends nothing on the user's behalf: :func:`backend_telemetry_off` stops the sender before a backend is used.
``MODEL_OPT_BACKEND_TELEMETRY=1`` leaves the backends' own choice in place.
"""

from __future__ import annotations

import os


def backend_telemetry_off() -> bool:
    """Stop OpenVINO's and NNCF's telemetry sender in this process (every message is dropped, no process is
    forked); returns whether it is off. Idempotent; cheap when called again."""
    if os.environ.get("MODEL_OPT_BACKEND_TELEMETRY", "").strip() == "1":
        return False
    try:
        from openvino_telemetry.utils.sender import TelemetrySender
    except ImportError:  # no OpenVINO telemetry installed: nothing is sent
        return True
    if not getattr(TelemetrySender.send, "_model_opt_off", False):
        def send(self: object, backend: object, message: object) -> None:
            """Dropped: model-opt sends no telemetry on the user's behalf."""

        send._model_opt_off = True  # type: ignore[attr-defined]
        TelemetrySender.send = send  # type: ignore[method-assign]
    return True
