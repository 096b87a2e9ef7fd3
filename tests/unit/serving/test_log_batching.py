"""The traffic and feedback logs on S3 (moto's server): records of many requests batched into few objects,
each written by one PUT off the caller's thread, the last batch on shutdown, a bounded buffer while S3 is
down, and what monitoring reads back (:class:`airloom.data.partitions.DailyPartitions`)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from airloom.data.partitions import DailyPartitions
from airloom.exceptions import RegistryError
from airloom.registry.store import S3Store
from airloom.serving.logs import Batching, FeedbackLog, TrafficLog

DAY = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)
NEVER = 3600.0  # a batch age no test waits for: only size and shutdown cut batches


@pytest.fixture
def root(moto_bucket) -> str:
    return f"s3://{moto_bucket}/logs-{uuid.uuid4().hex[:10]}/data/traffic"


def _store(root: str) -> S3Store:
    bucket, _, prefix = root[len("s3://") :].partition("/")
    return S3Store(bucket, prefix)


def _objects(root: str) -> dict[str, list[dict]]:
    store = _store(root)
    return {
        key: [json.loads(line) for line in store.get_bytes(key).decode().splitlines()]
        for key in store.list("")
    }


def _id(i: int) -> str:
    return f"cmpl-{i:03d}"  # one width: every record has the same size


def _record(i: int, **extra) -> dict:
    return {
        "id": _id(i),
        "response_id": _id(i),
        "model": "tiny/1",
        "prompt": f"question {i:03d}",
        "response": f"answer {i:03d}",
        **extra,
    }


def _until(check, timeout: float = 30.0, what: str = "it"):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return got


def test_requests_from_many_threads_end_up_in_few_objects(root):
    log = TrafficLog(root, batching=Batching(records=50, seconds=NEVER))
    assert log.remote

    def requests(start: int) -> None:  # 8 handlers, 25 requests each, one record per request
        for i in range(start, start + 25):
            log.write([_record(i)], DAY)

    threads = [threading.Thread(target=requests, args=(k * 25,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 200 records, a batch cut at every 50th: four objects, all written without a close
    assert log.flush(timeout=30)
    objects = _objects(root)
    assert len(objects) == 4, sorted(objects)
    assert all(key.startswith("ds=2026-03-04/") and key.endswith(".jsonl") for key in objects)
    assert sorted(len(rows) for rows in objects.values()) == [50, 50, 50, 50]
    # contents round-trip: every record once, as the log wrote it (scrubbed, with pii_masked)
    rows = [r for part in objects.values() for r in part]
    assert sorted(r["id"] for r in rows) == [_id(i) for i in range(200)]
    assert next(r for r in rows if r["id"] == _id(7)) == {**_record(7), "pii_masked": {}}
    stats = log.stats()
    assert (stats["objects_written"], stats["records_written"], stats["records_dropped"]) == (4, 200, 0)
    log.close()
    assert len(_objects(root)) == 4  # nothing left to write: close adds no object


def test_the_last_batch_is_written_on_shutdown(root, moto_bucket):
    feedback_root = root.replace("/traffic", "/feedback")
    traffic = TrafficLog(root, batching=Batching(records=1000, seconds=NEVER))
    feedback = FeedbackLog(feedback_root, batching=Batching(records=1000, seconds=NEVER))
    written = traffic.write([_record(i, pii=None) for i in range(7)], DAY)
    traffic.write([_record(7)], DAY + timedelta(days=1))  # another day: its own object
    feedback.write(
        {"id": "fb-1", "response_id": "cmpl-1", "rating": -1, "comment": "mail ann@example.org"}, DAY
    )
    assert traffic.writer is not None and traffic.writer.pending()["records"] == 8
    assert _objects(root) == {} and _objects(feedback_root) == {}  # neither size nor age reached
    traffic.close()
    feedback.close()
    objects = _objects(root)
    assert sorted(k.split("/")[0] for k in objects) == ["ds=2026-03-04", "ds=2026-03-05"]
    day = next(rows for key, rows in objects.items() if key.startswith("ds=2026-03-04/"))
    assert day == written
    (fb,) = _objects(feedback_root).values()
    assert fb[0]["comment"] == "mail <EMAIL>"  # masked before it left the process
    # after close nothing is taken any more: dropped and counted, not silently kept
    traffic.write([_record(99)], DAY)
    assert traffic.stats()["records_dropped"] == 1 and len(_objects(root)) == 2


def test_a_batch_is_written_when_its_first_record_is_old_enough(root):
    log = TrafficLog(root, batching=Batching(records=1000, seconds=0.3))
    log.write([_record(1), _record(2)], DAY)
    started = time.monotonic()
    (rows,) = _until(lambda: list(_objects(root).values()), what="the age-cut batch")
    assert time.monotonic() - started < 10 and [r["id"] for r in rows] == [_id(1), _id(2)]
    log.close()


def test_monitoring_reads_the_day_back_and_feedback_finds_other_servers_responses(root):
    one = TrafficLog(root, batching=Batching(records=3, seconds=NEVER))
    two = TrafficLog(root, batching=Batching(records=3, seconds=NEVER))  # another replica
    one.write([_record(i) for i in range(5)], DAY)
    two.write([_record(i) for i in range(5, 9)], DAY)
    one.close()
    two.close()
    day = DailyPartitions.open(root).read("2026-03-04")
    assert sorted(r["id"] for r in day) == [_id(i) for i in range(9)]
    assert DailyPartitions.open(root).read("2026-03-05") is None
    # a third server (a restart) has nothing in memory: it finds responses in the objects
    three = TrafficLog(root, batching=Batching(records=3, seconds=NEVER))
    found = three.find(_id(6), today=DAY)
    assert found == {
        "ds": "2026-03-04",
        "model": "tiny/1",
        "prompt": "question 006",
        "response": "answer 006",
    }
    assert three.find("cmpl-nope", today=DAY) is None
    assert three.find(_id(6), today=DAY + timedelta(days=10)) is None  # beyond lookup_days


class Flaky:
    """An S3Store that fails while ``down`` is set; ``lose_answer`` makes the next PUT land but raise."""

    def __init__(self, store: S3Store) -> None:
        self.store, self.down, self.lose_answer, self.puts = store, threading.Event(), False, 0

    def put_bytes(self, key, data, *, if_none_match=False):
        self.puts += 1
        if self.down.is_set():
            raise RegistryError(f"S3 put {self.uri(key)} failed: connection refused")
        etag = self.store.put_bytes(key, data, if_none_match=if_none_match)
        if self.lose_answer:
            self.lose_answer = False
            raise RegistryError("read timeout: the answer was lost")
        return etag

    def __getattr__(self, name):
        return getattr(self.store, name)


def _flaky_log(root: str, batching: Batching) -> tuple[TrafficLog, Flaky]:
    log = TrafficLog(root, batching=batching)
    assert log.writer is not None
    flaky = Flaky(log.writer.store)
    log.writer.store = flaky
    return log, flaky


def test_writes_never_wait_on_a_slow_s3(root):
    log, flaky = _flaky_log(root, Batching(records=2, seconds=NEVER))
    entered, release = threading.Event(), threading.Event()
    put = flaky.store.put_bytes

    def hanging(key, data, **kw):
        entered.set()
        assert release.wait(30)
        return put(key, data, **kw)

    flaky.store = SimpleNamespace(put_bytes=hanging, uri=flaky.store.uri, list=flaky.store.list)
    log.write([_record(0), _record(1)], DAY)
    assert entered.wait(10)  # the writer thread is inside a PUT that does not answer ...
    started = time.monotonic()
    for i in range(2, 40):  # ... and requests keep logging without waiting for it
        log.write([_record(i)], DAY)
    assert time.monotonic() - started < 2 and not release.is_set()
    assert log.writer is not None and log.writer.pending()["records"] == 40
    release.set()
    assert log.flush(timeout=30) and len(_objects(root)) == 20
    log.close()


def test_while_s3_is_down_the_buffer_is_bounded_and_drains_when_it_is_back(root, caplog):
    record_bytes = len((json.dumps({**_record(0), "pii_masked": {}}) + "\n").encode())
    log, flaky = _flaky_log(root, Batching(records=10, seconds=NEVER, buffer_bytes=30 * record_bytes))
    flaky.down.set()
    for i in range(50):  # requests go on: none waits, none fails
        log.write([_record(i)], DAY)
    writer = log.writer
    assert writer is not None
    # 30 records fit the bound; the other 20 were dropped, counted and logged at ERROR
    assert writer.pending()["records"] == 30 and writer.pending()["bytes"] <= 30 * record_bytes
    assert log.stats()["records_dropped"] == 20
    _until(lambda: log.stats()["upload_failures"] >= 1, what="a failed upload")
    assert any("dropping records" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    assert any("failed (try 1" in r.getMessage() for r in caplog.records)
    assert _objects(root) == {}
    flaky.down.clear()
    assert log.flush(timeout=30)  # the retry (1 s backoff) writes all three batches
    rows = [r for part in _objects(root).values() for r in part]
    assert sorted(r["id"] for r in rows) == [_id(i) for i in range(30)]
    assert len(_objects(root)) == 3
    log.close()


def test_a_put_whose_answer_was_lost_is_written_once(root):
    log, flaky = _flaky_log(root, Batching(records=5, seconds=NEVER))
    flaky.lose_answer = True
    log.write([_record(i) for i in range(5)], DAY)
    assert log.flush(timeout=30)
    (rows,) = _objects(root).values()  # the retry found it there (If-None-Match): no second object
    assert [r["id"] for r in rows] == [_id(i) for i in range(5)]
    assert flaky.puts == 2 and log.stats()["upload_failures"] == 1 and log.stats()["objects_written"] == 1
    log.close()


def test_shutdown_with_s3_down_keeps_the_records_on_local_disk(root, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AIRLOOM_HOME", str(tmp_path / "home"))
    log, flaky = _flaky_log(root, Batching(records=1000, seconds=NEVER))
    flaky.down.set()
    log.write([_record(i) for i in range(4)], DAY)
    log.close(timeout=1)
    (spilled,) = (tmp_path / "home" / "data" / "unsent" / "traffic" / "ds=2026-03-04").glob("*.jsonl")
    assert [json.loads(line)["id"] for line in spilled.read_text().splitlines()] == [_id(i) for i in range(4)]
    assert any(str(tmp_path / "home" / "data" / "unsent") in r.getMessage() for r in caplog.records)
    assert _objects(root) == {}


def test_a_folder_root_appends_as_before(tmp_path):
    log = TrafficLog(tmp_path / "traffic")
    assert not log.remote and log.stats() is None
    log.write([_record(1)], DAY)
    log.write([_record(2)], DAY)
    log.close()
    (part,) = (tmp_path / "traffic" / "ds=2026-03-04").glob("part-*.jsonl")
    assert [json.loads(line)["id"] for line in part.read_text().splitlines()] == [_id(1), _id(2)]
    assert [r["id"] for r in DailyPartitions.open(tmp_path / "traffic").read("2026-03-04")] == [
        _id(1),
        _id(2),
    ]


def test_batching_settings_are_checked():
    from airloom.exceptions import UsageError

    for bad in ({"records": 0}, {"seconds": 0}, {"buffer_bytes": 0}):
        with pytest.raises(UsageError, match="log batching"):
            Batching(**bad)
