"""A call computed in a forked child process while this one goes on (verify's weight-space check runs beside
the import of transformers and the model's config: one core each, where in one process they would take
turns).

Used only where a fork is safe: Linux, and no thread of this interpreter but the main one (a lock another
thread held would stay locked in the child). torch's own worker threads are not Python threads: the child
sets torch to one thread before its first operation (an OpenMP pool from before the fork does not exist in
the child; asked for more than one thread, it would wait on it for ever). Elsewhere the call runs here, when
its result is asked for. The result comes back as JSON through a pipe (plain values: the check's counts and
figures; no unpickling), an exception as its class name and text (polytool's own errors are raised again as
themselves, anything else as an internal error); the child ends with os._exit, so nothing of the parent
(atexit handlers, buffered output, a test runner) runs twice.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any, Callable

from ..errors import PolytoolError


def can_fork() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork") and threading.active_count() == 1


class Forked:
    """fn(*args) in a child process (where `can_fork`; else here, at `result`): `result()` waits for it and
    returns its value or raises its exception; `cancel()` ends it (a run that failed before asking)."""

    def __init__(self, fn: Callable, *args: Any, child: bool = True):
        self.fn, self.args, self.pid, self.fd = fn, args, None, None
        if not (child and can_fork()):  # `child` False: here, at `result`
            return
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: compute, send, end
            os.close(read)
            _child(write, fn, args)
        os.close(write)
        self.pid, self.fd = pid, read

    def result(self) -> Any:
        if self.pid is None:
            return self.fn(*self.args)
        chunks = []
        try:
            while chunk := os.read(self.fd, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(self.fd)
            _, status = os.waitpid(self.pid, 0)
            self.pid = None
        try:
            sent = json.loads(b"".join(chunks)) if os.WIFEXITED(status) and status == 0 else None
        except ValueError:  # cut short
            sent = None
        if not isinstance(sent, dict):
            why = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.waitstatus_to_exitcode(status)}"
            raise PolytoolError(f"the weight-space check's process ended without a result ({why}; killed for "
                                "memory?)")
        if "value" in sent:
            return sent["value"]
        raise _exception(sent)

    def cancel(self) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(self.fd)
        os.waitpid(self.pid, 0)
        self.pid = None


def _child(fd: int, fn: Callable, args: tuple) -> None:
    code = 0
    try:
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        payload = json.dumps({"value": fn(*args)}, default=_plain)
    except BaseException as exc:  # noqa: BLE001 (every outcome goes back to the parent)
        payload = json.dumps({"error": type(exc).__name__, "text": str(exc),
                              "message": getattr(exc, "message", None), "path": getattr(exc, "path", None)})
    try:
        view = memoryview(payload.encode())
        while view.nbytes:
            view = view[os.write(fd, view):]
    except BaseException:  # noqa: BLE001 (the parent is gone: nothing to tell)
        code = 1
    finally:
        os._exit(code)


def _plain(value: Any) -> Any:
    """numpy scalars (an int64 count) as Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a plain value")


def _exception(sent: dict) -> BaseException:
    """The child's exception, raised here: polytool's own errors as themselves, Ctrl-C as Ctrl-C, anything else
    as an internal error naming it."""
    classes, known = [PolytoolError], {}
    while classes:  # PolytoolError and its subclasses, by name
        cls = classes.pop()
        known[cls.__name__] = cls
        classes += cls.__subclasses__()
    if sent["error"] in known:
        try:
            return known[sent["error"]](sent["message"], sent["path"])
        except TypeError:  # a subclass made otherwise: its text
            return PolytoolError(sent["text"])
    if sent["error"] == "KeyboardInterrupt":
        return KeyboardInterrupt()
    return RuntimeError(f"the weight-space check failed: {sent['error']}: {sent['text']}")
