"""Daily backfill: read a dated partition, evaluate it into its own folder, collect the trend."""

from __future__ import annotations

import json

import pytest

from airloom.evaluation.backfill import (
    build_trend,
    day_end,
    evaluate_partition,
    partition_dir,
    read_partition,
    version_dir,
)
from airloom.exceptions import UsageError


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _records(n: int, tag: str) -> list[dict]:
    return [
        {
            "id": f"{tag}-{i}",
            "prompt": "### Instruction:\nName a primary colour.\n### Response:\n",
            "response": "Red",
            "task": "colour" if i % 2 else "other",
        }
        for i in range(n)
    ]


def test_partition_dir(tmp_path):
    assert partition_dir(tmp_path, "2026-01-02") == tmp_path / "ds=2026-01-02"
    assert version_dir(tmp_path, "demo", "2026-01-02", 3) == tmp_path / "demo" / "ds=2026-01-02" / "v3"


def test_day_end_is_the_next_utc_midnight():
    assert day_end("2026-12-31").isoformat() == "2027-01-01T00:00:00+00:00"


def test_read_partition_missing_is_none(tmp_path):
    assert read_partition(tmp_path, "2026-01-01") is None
    (tmp_path / "ds=2026-01-01").mkdir()
    assert read_partition(tmp_path, "2026-01-01") is None  # a folder with no JSONL is no data either


def test_read_partition_concatenates_files_in_name_order(tmp_path):
    _write(tmp_path / "ds=2026-01-01" / "b.jsonl", _records(1, "b"))
    _write(tmp_path / "ds=2026-01-01" / "a.jsonl", _records(2, "a"))
    (tmp_path / "ds=2026-01-01" / "notes.txt").write_text("ignored")
    _write(tmp_path / "ds=2026-01-02" / "a.jsonl", _records(5, "other-day"))
    rows = read_partition(tmp_path, "2026-01-01")
    assert [r["id"] for r in rows] == ["a-0", "a-1", "b-0"]


def test_read_partition_bad_line_names_the_file(tmp_path):
    path = tmp_path / "ds=2026-01-01" / "records.jsonl"
    path.parent.mkdir()
    path.write_text('{"id": "1"}\nnot json\n')
    with pytest.raises(UsageError, match=r"records\.jsonl:2: not valid JSON"):
        read_partition(tmp_path, "2026-01-01")


def _metrics(ds: str, em: float, *, with_ds: bool = True) -> dict:
    m = {
        "model_ref": "demo/3",
        "n": 10,
        "aggregate": {"exact_match": em, "f1": em + 0.1, "rougeL": em + 0.2, "bleu": 12.0},
    }
    return {**m, "ds": ds} if with_ds else m


def test_build_trend_reads_unversioned_partitions(tmp_path):
    """Partitions written before results were split by version (``ds=<date>/metrics.json``) still chart."""
    root = tmp_path / "demo"
    for ds, em in [("2026-01-03", 0.3), ("2026-01-01", 0.1), ("2026-01-02", 0.2)]:
        _write(root / f"ds={ds}" / "metrics.json", [])
        (root / f"ds={ds}" / "metrics.json").write_text(
            json.dumps(_metrics(ds, em, with_ds=ds != "2026-01-02"))
        )
    (root / ".ds=2026-01-04.abc.tmp").mkdir()  # an in-flight evaluation is not a date yet

    trend = build_trend(root)
    assert trend["dates"] == 3
    assert [r["ds"] for r in trend["rows"]] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert trend["rows"][1] == {
        "ds": "2026-01-02",
        "version": None,
        "live_version": None,
        "model_ref": "demo/3",
        "n": 10,
        "exact_match": 0.2,
        "f1": pytest.approx(0.3),
        "rougeL": pytest.approx(0.4),
    }
    assert trend["changes"] == [] and trend["versions"] == []
    assert json.loads((root / "trend.json").read_text())["rows"] == trend["rows"]
    png = root / "trend.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert trend["plot"] == str(png)

    trend = build_trend(root, metrics=("bleu",))
    assert [r["bleu"] for r in trend["rows"]] == [12.0, 12.0, 12.0]


def test_build_trend_rows_per_version_and_production_changes(tmp_path):
    root = tmp_path / "demo"
    # Days 1-2 live on v1, days 3-4 on v2; day 1 was also scored with today's version (v2).
    for ds, version, live, em in [
        ("2026-01-01", 1, 1, 0.1),
        ("2026-01-01", 2, 1, 0.4),
        ("2026-01-02", 1, 1, 0.2),
        ("2026-01-03", 2, 2, 0.5),
        ("2026-01-04", 2, 2, 0.6),
    ]:
        folder = version_dir(tmp_path, "demo", ds, version)
        folder.mkdir(parents=True)
        m = {**_metrics(ds, em), "model_ref": f"demo/{version}", "version": version, "live_version": live}
        (folder / "metrics.json").write_text(json.dumps(m))
    (root / "ds=2026-01-04" / ".v3.abc.tmp").mkdir()  # an in-flight evaluation is not a version yet

    trend = build_trend(root)
    assert trend["dates"] == 4 and trend["versions"] == [1, 2]
    assert [(r["ds"], r["version"], r["exact_match"]) for r in trend["rows"]] == [
        ("2026-01-01", 1, 0.1),
        ("2026-01-01", 2, 0.4),
        ("2026-01-02", 1, 0.2),
        ("2026-01-03", 2, 0.5),
        ("2026-01-04", 2, 0.6),
    ]
    assert trend["changes"] == [{"ds": "2026-01-03", "from": 1, "to": 2}]
    assert json.loads((root / "trend.json").read_text())["changes"] == trend["changes"]
    assert (root / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_build_trend_with_no_dates(tmp_path):
    trend = build_trend(tmp_path)
    assert trend["dates"] == 0 and trend["rows"] == []
    assert (tmp_path / "trend.json").exists()
    assert not (tmp_path / "trend.png").exists()


def test_evaluate_partition_replaces_only_its_date_and_version(tmp_path, tiny_model_dir):
    out_root = tmp_path / "evals"
    other_day = version_dir(out_root, "demo", "2026-01-01", 3)
    other_version = version_dir(out_root, "demo", "2026-01-02", 4)
    for folder, ds in [(other_day, "2026-01-01"), (other_version, "2026-01-02")]:
        _write(folder / "metrics.json", [])
        (folder / "metrics.json").write_text(json.dumps(_metrics(ds, 0.5)))
    untouched = {f: f.read_bytes() for f in out_root.rglob("metrics.json")}

    target = version_dir(out_root, "demo", "2026-01-02", 3)
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("from an earlier run")

    def run(records, ref):
        return evaluate_partition(
            str(tiny_model_dir),
            ref,
            records,
            out_root,
            "demo",
            "2026-01-02",
            version=3,
            live_version=4,
            max_new_tokens=4,
        )

    metrics = run(_records(4, "x"), "demo/3")
    assert (metrics["ds"], metrics["model_ref"], metrics["n"]) == ("2026-01-02", "demo/3", 4)
    assert (metrics["version"], metrics["live_version"]) == (3, 4)
    assert json.loads((target / "metrics.json").read_text()) == metrics
    assert len((target / "predictions.jsonl").read_text().splitlines()) == 4
    assert not (target / "stale.txt").exists()
    assert {f: f.read_bytes() for f in untouched} == untouched

    # A rerun of the same date and version replaces it again; still no temp folders left.
    run(_records(2, "y"), "demo/3 again")
    assert json.loads((target / "metrics.json").read_text())["model_ref"] == "demo/3 again"
    assert [json.loads(line)["id"] for line in (target / "predictions.jsonl").read_text().splitlines()] == [
        "y-0",
        "y-1",
    ]
    assert {f: f.read_bytes() for f in untouched} == untouched
    assert sorted(p.relative_to(out_root).as_posix() for p in out_root.rglob("metrics.json")) == [
        "demo/ds=2026-01-01/v3/metrics.json",
        "demo/ds=2026-01-02/v3/metrics.json",
        "demo/ds=2026-01-02/v4/metrics.json",
    ]
    assert not [p for p in out_root.rglob("*") if p.name.startswith(".")]


@pytest.mark.parametrize("failure", ["bad_records", "no_model"])
def test_failed_evaluation_keeps_the_previous_partition(tmp_path, failure):
    out_root = tmp_path / "evals"
    target = version_dir(out_root, "demo", "2026-01-02", 5)
    target.mkdir(parents=True)
    (target / "metrics.json").write_text(json.dumps(_metrics("2026-01-02", 0.7)))
    before = (target / "metrics.json").read_bytes()
    if failure == "bad_records":
        model, records, match = tmp_path, [{"id": "1", "prompt": "p"}], r"missing field 'response'"
    else:  # fails after the temporary output folder exists
        model, records, match = (
            tmp_path / "nowhere",
            _records(2, "z"),
            r"nowhere is not a saved model directory",
        )
    with pytest.raises(UsageError, match=match):
        evaluate_partition(str(model), "demo/5", records, out_root, "demo", "2026-01-02", version=5)
    assert (target / "metrics.json").read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["v5"]
