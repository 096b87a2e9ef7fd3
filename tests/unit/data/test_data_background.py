"""airloom.data.background: calls run in a forked child, in order, errors and all."""

from __future__ import annotations

import multiprocessing

import pytest

from airloom.data.background import Background, Local
from airloom.exceptions import UsageError


class Tally:
    def __init__(self, start: int) -> None:
        self.total = start

    def add(self, values: list[int]) -> None:
        self.total += sum(values)

    def value(self) -> int:
        return self.total


def echo(blob: bytes) -> bytes:
    return blob


def refuse(row: int) -> None:
    raise UsageError(f"record {row}: instruction must be text")


@pytest.mark.parametrize("kind", [Background, Local])
def test_calls_run_in_order_and_answers_come_back(kind):
    work = kind(Tally, 10)
    for k in range(100):
        work.post("add", [k, 1])
    total = work.ask("value")
    assert total() == 10 + sum(range(100)) + 100
    work.close()


def test_big_calls_and_big_answers_may_cross():
    # prepare's pattern: the next chunk goes out before the last answer is read; both are bigger than a
    # pipe's buffer, which would block both processes if one thread did both
    work = Background(dict)
    blob = bytes(range(256)) * 40_000  # 10 MB
    pending = None
    for _ in range(5):
        job = work.ask(echo, blob)
        if pending is not None:
            assert pending() == blob
        pending = job
    assert pending() == blob
    work.close()


def test_the_childs_exception_is_raised_here_as_itself():
    work = Background(dict)
    with pytest.raises(UsageError, match="record 7: instruction must be text"):
        work.ask(refuse, 7)()
    work.close()  # a second close is harmless


def _inside_a_daemon(queue) -> None:
    work = Background(Tally, 1)
    work.post("add", [2, 3])
    queue.put(work.ask("value")())
    work.close()


def test_it_works_in_a_daemonic_process_as_a_celery_task_runs():
    # multiprocessing refuses children to daemonic processes (Celery's prefork pool); os.fork does not
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_inside_a_daemon, args=(queue,), daemon=True)
    proc.start()
    assert queue.get(timeout=30) == 6
    proc.join(timeout=30)
    assert proc.exitcode == 0
