"""Run an object's methods in a forked child process, so a pass over the data uses both cores.

``Background(factory, *args)`` forks a child that builds ``factory(*args)`` and then runs the method
calls it is sent, in order. :meth:`Background.post` sends a call and goes on (the pipe blocks only
while the child is a few calls behind: back-pressure); :meth:`Background.ask` sends a call whose value
is wanted and returns a function that waits for it. :class:`Local` has the same interface and runs
the calls in place, for small inputs and tests.

The child is forked (it starts at once, with the parent's modules loaded; ``os.fork``, so it also
works in a daemonic Celery pool process); what it is sent and what it returns is pickled, so
arguments are arrays and lists of text, and functions are module-level.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
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

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.obj.close()


class Background:
    """``factory(*args)`` in a forked child; see the module docstring."""

    def __init__(self, factory: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        # os.fork, not multiprocessing.Process: an Airflow task under Celery runs in a daemonic pool
        # process, and multiprocessing refuses to start children there
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the child: serve, then leave without the parent's exit handlers
            code = 0
            try:
                parent_end.close()
                _serve(Connection(child_end.detach()), factory, args, kwargs)
            except BaseException:  # noqa: BLE001 - nothing must escape into the parent's code
                code = 1
            finally:
                os._exit(code)
        child_end.close()
        self._conn = Connection(parent_end.detach())
        self._proc = _Child(pid)
        self._asked = 0  # answers asked for
        self._got: dict[int, Any] = {}  # answers received, by number
        self._closed = False
        # Calls go out through a thread: a big call and a big answer crossing would otherwise block both
        # processes on a full pipe. Two calls queued at most: the caller still waits for a slow child.
        self._outbox: queue.Queue = queue.Queue(maxsize=2)
        self._send_error: BaseException | None = None
        self._sender = threading.Thread(target=self._send_loop, name="airloom-background-send", daemon=True)
        self._sender.start()

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            try:
                self._conn.send(item)  # None: the child's cue to stop
            except OSError as exc:  # the child stopped: it failed on an earlier call and said why
                self._send_error = exc
                return
            if item is None:
                return

    def _put(self, item: tuple) -> None:
        if self._send_error is not None or not self._sender.is_alive():
            error = self._conn.recv() if self._conn.poll(5) else ("error", "it exited")
            self.close()
            if error[0] == "raise":
                raise error[1]
            raise RuntimeError(f"the background process failed:\n{error[1]}")
        self._outbox.put(item)

    def post(self, method: str, *args: Any) -> None:
        self._put((False, method, args))

    def ask(self, method: str | Callable[..., Any], *args: Any) -> Callable[[], Any]:
        """Send a call (a method name, or a module-level function run in the child); return a function
        that waits for its value (answers come in the order asked)."""
        self._put((True, method, args))
        number = self._asked
        self._asked += 1

        def collect() -> Any:
            while number not in self._got:
                self._receive()
            return self._got[number]

        return collect

    def _receive(self) -> None:
        kind, value = self._conn.recv()
        if kind == "raise":  # the call's own exception (e.g. a UsageError naming a bad row)
            self.close()
            raise value
        if kind == "error":
            self.close()
            raise RuntimeError(f"the background process failed:\n{value}")
        self._got[len(self._got)] = value

    def ready(self) -> bool:
        """Whether every answer asked for has come; receives those waiting, never waits itself. Once
        it has, :meth:`close` frees the child's memory and the answers stay collectable."""
        while not self._closed and len(self._got) < self._asked and self._conn.poll(0):
            self._receive()
        return len(self._got) >= self._asked

    def close(self) -> None:
        import time

        if self._closed:
            return
        self._closed = True
        stop_queued = not self._sender.is_alive()
        if stop_queued and self._proc.is_alive():  # no sender thread left: say stop directly
            with contextlib.suppress(OSError):
                self._conn.send(None)
        deadline = time.monotonic() + 60
        while self._proc.is_alive() and time.monotonic() < deadline:
            if not stop_queued:  # behind what is queued: one writer on the pipe at a time
                with contextlib.suppress(queue.Full):
                    self._outbox.put_nowait(None)
                    stop_queued = True
            # answers nobody collected (an error path) would keep the child blocked on a full pipe
            with contextlib.suppress(OSError, EOFError):
                if self._conn.poll(0.05):
                    self._conn.recv()
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        if not stop_queued:
            with contextlib.suppress(queue.Full):
                self._outbox.put_nowait(None)
        self._sender.join(timeout=5)
        self._conn.close()


class _Child:
    """The forked child, as much of ``multiprocessing.Process`` as :class:`Background` uses."""

    def __init__(self, pid: int) -> None:
        self.pid, self.exitcode = pid, None

    def is_alive(self) -> bool:
        if self.exitcode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exitcode = os.waitstatus_to_exitcode(status)
        return self.exitcode is None

    def kill(self) -> None:
        if self.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def join(self) -> None:
        if self.exitcode is None:
            _, status = os.waitpid(self.pid, 0)
            self.exitcode = os.waitstatus_to_exitcode(status)


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
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        import pickle
        import traceback

        try:
            pickle.loads(pickle.dumps(exc))
            answer = ("raise", exc)
        except Exception:  # noqa: BLE001 - not picklable: send the text
            answer = ("error", traceback.format_exc())
        with contextlib.suppress(OSError):
            conn.send(answer)
    finally:
        with contextlib.suppress(AttributeError):
            obj.close()  # type: ignore[union-attr]
        conn.close()
