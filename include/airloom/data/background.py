"""Run an object's methods in a forked child process, so a pass over the data uses both cores.

``Background(factory, *args)`` forks a child that builds ``factory(*args)`` and then runs the method
calls it is sent, in order. :meth:`Background.post` sends a call and goes on (the pipe blocks only
while the child is a few calls behind: back-pressure); :meth:`Background.ask` sends a call whose value
is wanted and returns a function that waits for it. :class:`Local` has the same interface and runs
the calls in place, for small inputs and tests.

The child is forked (it starts at once, with the parent's modules loaded); what it is sent and what
it returns is pickled, so arguments are arrays and lists of text, and functions are module-level.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any


class Local:
    """:class:`Background`'s interface, calls run at once in this process."""

    def __init__(self, factory: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.obj = factory(*args, **kwargs)

    def post(self, method: str, *args: Any) -> None:
        getattr(self.obj, method)(*args)

    def ask(self, method: str | Callable[..., Any], *args: Any) -> Callable[[], Any]:
        value = method(*args) if callable(method) else getattr(self.obj, method)(*args)
        return lambda: value

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.obj.close()


class Background:
    """``factory(*args)`` in a forked child; see the module docstring."""

    def __init__(self, factory: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, factory, args, kwargs), daemon=True)
        self._proc.start()
        child.close()
        self._asked = 0  # answers asked for
        self._got: dict[int, Any] = {}  # answers received, by number

    def post(self, method: str, *args: Any) -> None:
        try:
            self._conn.send((False, method, args))
        except OSError:  # the child stopped: it failed on an earlier call and said why
            error = self._conn.recv() if self._conn.poll(5) else ("error", "it exited")
            self.close()
            raise RuntimeError(f"the background process failed:\n{error[1]}") from None

    def ask(self, method: str | Callable[..., Any], *args: Any) -> Callable[[], Any]:
        """Send a call (a method name, or a module-level function run in the child); return a function
        that waits for its value (answers come in the order asked)."""
        self._conn.send((True, method, args))
        number = self._asked
        self._asked += 1

        def collect() -> Any:
            while number not in self._got:
                kind, value = self._conn.recv()
                if kind == "error":
                    self.close()
                    raise RuntimeError(f"the background process failed:\n{value}")
                self._got[len(self._got)] = value
            return self._got[number]

        return collect

    def close(self) -> None:
        import time

        if self._proc.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(None)
        deadline = time.monotonic() + 60
        while self._proc.is_alive() and time.monotonic() < deadline:
            # answers nobody collected (an error path) would keep the child blocked on a full pipe
            with contextlib.suppress(OSError, EOFError):
                if self._conn.poll(0.05):
                    self._conn.recv()
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        self._conn.close()


def _serve(conn: Any, factory: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    obj = None
    try:
        obj = factory(*args, **kwargs)
        while (message := conn.recv()) is not None:
            reply, method, margs = message
            value = method(*margs) if callable(method) else getattr(obj, method)(*margs)
            if reply:
                conn.send(("ok", value))
    except EOFError:  # the parent went away
        pass
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        import traceback

        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        with contextlib.suppress(AttributeError):
            obj.close()  # type: ignore[union-attr]
        conn.close()
