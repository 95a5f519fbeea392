"""Runs one Python function call inside a job's sandbox: the only place a client's pickle is ever loaded.

The client ships this file as the job's input ``coop_runner.py`` next to ``coop_call.pkl`` and runs
``python3 -m coop_runner`` in the chosen runtime. It imports only the standard library and cloudpickle (which the
runtime must have), so it does not depend on this package being installed where it runs.

Files (each a JSON header line, then the pickle):
    coop_call.pkl    ``{"format": 1, "python": "3.11"}`` + cloudpickle of ``(fn, args, kwargs)``
    coop_result.pkl  ``{"ok": true}`` + the pickled return value, or ``{"ok": false, "type", "message",
                     "traceback", "pickled"}`` + the pickled exception when it pickles (else nothing)

The process exits 0 whenever it wrote a result, a raised exception included: the job ran, and its outcome is in
the result file. Any other exit means the runner itself could not run (the client says so with the stderr).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

FORMAT = 1
CALL_FILE = "coop_call.pkl"
RESULT_FILE = "coop_result.pkl"
RESULT_CAP_ENV = "COOP_RESULT_MAX_BYTES"


def _write(header: dict[str, Any], body: bytes = b"") -> None:
    tmp = RESULT_FILE + ".tmp"
    with open(tmp, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n" + body)
    os.replace(tmp, RESULT_FILE)


def _failure(exc: BaseException, *, what: str = "") -> None:
    import cloudpickle

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    header: dict[str, Any] = {
        "ok": False,
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": (what + str(exc))[:4000],
        "traceback": text[-20000:],
        "pickled": False,
    }
    body = b""
    try:
        body = cloudpickle.dumps(exc.with_traceback(None))
        header["pickled"] = True
    except Exception:  # an exception that does not pickle still has its type, message and traceback
        body = b""
    _write(header, body)


def main() -> int:
    with open(CALL_FILE, "rb") as f:
        head, _, body = f.read().partition(b"\n")
    meta = json.loads(head)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if meta.get("format") != FORMAT or meta.get("python") != here:
        message = (
            f"this runtime's Python {here} cannot load a call pickled by Python {meta.get('python')} "
            f"(format {meta.get('format')}): choose a runtime with the same Python version"
        )
        _write({"ok": False, "type": "builtins.RuntimeError", "message": message, "traceback": "", "pickled": False})
        return 0
    try:
        import cloudpickle
    except ImportError as exc:
        _write({"ok": False, "type": "builtins.ImportError", "pickled": False, "traceback": "",
                "message": f"cloudpickle is not installed in this runtime ({exc})"})  # fmt: skip
        return 0
    try:
        fn, args, kwargs = cloudpickle.loads(body)
    except BaseException as exc:  # e.g. a module the function needs is not in this runtime
        _failure(exc, what="could not load the call: ")
        return 0
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:  # the function's own exception is its result
        _failure(exc)
        return 0
    try:
        data = cloudpickle.dumps(value)
    except Exception as exc:
        _failure(exc, what="the return value could not be pickled: ")
        return 0
    cap = int(os.environ.get(RESULT_CAP_ENV, str(1 << 62)))
    if len(data) > cap:
        _failure(ValueError(f"the return value pickles to {len(data)} bytes, over the cap of {cap}"))
        return 0
    _write({"ok": True}, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
