"""The ``airloom`` command, run in-process: exit codes 0 ok / 1 failed check / 2 bad usage, one stderr line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from airloom.cli import main
from airloom.data.synth import generate_records, write_jsonl

VENV_BIN = Path(sys.executable).parent


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` with argparse's SystemExit turned into a return code, like the console script."""
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    """The single ``airloom: ...`` line an AirloomError leaves on stderr."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {lines}"
    assert lines[0].startswith("airloom: ")
    return lines[0]


@pytest.fixture()
def clean_jsonl(tmp_path) -> Path:
    return write_jsonl(generate_records(50, seed=3), tmp_path / "clean.jsonl")


@pytest.fixture()
def model_folder(tmp_path) -> Path:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (folder / "sub" / "notes.txt").write_text("tokenizer notes\n")
    return folder


def test_console_script_is_installed():
    proc = subprocess.run([str(VENV_BIN / "airloom"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: airloom" in proc.stdout
    for sub in ("validate", "prepare", "registry", "signoff", "evaluate"):
        assert sub in proc.stdout


# -- usage errors (exit 2) ----------------------------------------------------------------------------


def test_missing_input_file_exits_2_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nope" / "raw.jsonl"
    rc, out, err = run(capsys, "validate", str(missing), "--out", str(tmp_path / "v"))
    assert rc == 2
    assert str(missing) in error_line(err)
    assert "no such file" in err
    assert not (tmp_path / "v").exists()


def test_missing_input_of_prepare_exits_2(tmp_path, capsys):
    missing = tmp_path / "raw.jsonl"
    rc, _, err = run(capsys, "prepare", str(missing), "--out", str(tmp_path / "p"))
    assert rc == 2
    assert str(missing) in error_line(err)


def test_unknown_subcommand_exits_2(capsys):
    rc, out, err = run(capsys, "frobnicate")
    assert rc == 2
    assert "frobnicate" in err
    assert out == ""


def test_bad_version_ref_exits_2(tmp_path, capsys):
    rc, _, err = run(capsys, "--registry", str(tmp_path / "reg"), "registry", "verify", "demo@latest")
    assert rc == 2
    assert "NAME/VERSION" in error_line(err)


# -- data ---------------------------------------------------------------------------------------------


def test_validate_clean_data_passes(tmp_path, clean_jsonl, capsys):
    out_dir = tmp_path / "val"
    rc, out, err = run(capsys, "validate", str(clean_jsonl), "--out", str(out_dir), "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report == json.loads((out_dir / "validation.json").read_text())
    assert report["success"] is True
    assert len((out_dir / "accepted.jsonl").read_text().splitlines()) == 50


def test_validate_duplicated_data_fails_with_exit_1(tmp_path, capsys):
    records = list(generate_records(35, seed=4))
    records += [dict(r, id=f"{r['id']}-copy") for r in records[:15]]  # 15 of 50 rows repeat one: 30%
    src = write_jsonl(records, tmp_path / "dups.jsonl")
    rc, out, _ = run(capsys, "validate", str(src), "--out", str(tmp_path / "val"), "--json")
    assert rc == 1
    report = json.loads(out)
    assert report["success"] is False
    assert any("quarantined 15 of 50" in r for r in report["reasons"]), report["reasons"]


def test_prepare_writes_splits(tmp_path, clean_jsonl, capsys):
    out_dir = tmp_path / "prepared"
    rc, out, err = run(
        capsys,
        "prepare",
        str(clean_jsonl),
        "--out",
        str(out_dir),
        "--seed",
        "1",
        "--val-fraction",
        "0.2",
        "--test-fraction",
        "0.2",
        "--json",
    )
    assert rc == 0, err
    manifest = json.loads(out)
    assert manifest == json.loads((out_dir / "manifest.json").read_text())
    from airloom.data.splits import read_split

    rows = {s: read_split(out_dir / f"{s}.parquet") for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in rows.items()} == {s: manifest["splits"][s]["rows"] for s in rows}
    assert sum(len(v) for v in rows.values()) == 50
    assert len(rows["validation"]) > 0 and len(rows["test"]) > 0
    ids = [r["id"] for v in rows.values() for r in v]
    assert len(set(ids)) == 50
    first = rows["train"][0]
    assert first["prompt"].startswith("### Instruction:\n") and first["prompt"].endswith("### Response:\n")


# -- registry -----------------------------------------------------------------------------------------


def test_registry_round_trip(tmp_path, model_folder, capsys):
    reg = ["--registry", str(tmp_path / "reg")]

    rc, out, err = run(
        capsys, *reg, "registry", "register", "demo", str(model_folder), "--user", "alice", "--json"
    )
    assert rc == 0, err
    v1 = json.loads(out)
    assert (v1["name"], v1["version"], v1["created_by"]) == ("demo", 1, "alice")
    assert {f["path"] for f in v1["files"]} >= {"config.json", "weights.bin", "sub/notes.txt"}

    rc, out, _ = run(capsys, *reg, "registry", "register", "demo", str(model_folder), "--user", "bob")
    assert rc == 0 and "demo/2" in out

    rc, out, _ = run(capsys, *reg, "registry", "list", "demo", "--json")
    assert rc == 0
    assert [(r["version"], r["created_by"], r["aliases"]) for r in json.loads(out)] == [
        (1, "alice", []),
        (2, "bob", []),
    ]

    rc, out, _ = run(capsys, *reg, "registry", "show", "demo/1", "--json")
    assert rc == 0 and json.loads(out)["version"] == 1

    rc, out, _ = run(capsys, *reg, "registry", "verify", "demo/1")
    assert rc == 0 and "every file matches" in out

    # production only takes a signed-off version: unapproved → 1, then alice asks and bob approves.
    rc, _, err = run(capsys, *reg, "registry", "promote", "demo/1", "production", "--user", "carol")
    assert rc == 1 and "sign-off" in err
    assert run(capsys, *reg, "signoff", "request", "demo/1", "--user", "alice")[0] == 0
    assert run(capsys, *reg, "signoff", "approve", "demo/1", "--user", "bob")[0] == 0
    rc, out, err = run(
        capsys,
        *reg,
        "registry",
        "promote",
        "demo/1",
        "production",
        "--user",
        "carol",
        "--reason",
        "best eval",
    )
    assert rc == 0, err
    assert "demo@production -> 1" in out

    rc, out, _ = run(capsys, *reg, "registry", "show", "demo@production", "--json")
    assert json.loads(out)["version"] == 1
    rc, out, _ = run(capsys, *reg, "registry", "list", "demo", "--json")
    assert [r["aliases"] for r in json.loads(out)] == [["production"], []]

    rc, out, _ = run(capsys, *reg, "registry", "history", "demo", "--json")
    assert rc == 0
    history = json.loads(out)
    assert [h["actor"] for h in history if h.get("actor")][:2] == ["alice", "bob"]
    promotion = [h for h in history if h.get("alias") == "production"]
    assert promotion and promotion[-1]["actor"] == "carol" and promotion[-1]["reason"] == "best eval"


def test_registry_verify_names_the_corrupt_file(tmp_path, model_folder, capsys):
    reg = ["--registry", str(tmp_path / "reg")]
    rc, out, _ = run(capsys, *reg, "registry", "register", "demo", str(model_folder), "--json")
    assert rc == 0
    stored = list((tmp_path / "reg").rglob("weights.bin"))
    assert len(stored) == 1
    stored[0].write_bytes(b"tampered" + stored[0].read_bytes()[8:])  # same size, different bytes

    rc, _, err = run(capsys, *reg, "registry", "verify", "demo/1")
    assert rc == 1
    line = error_line(err)
    assert "weights.bin" in line and "corrupt" in line

    # A corrupt version must not be promoted either.
    rc, _, err = run(capsys, *reg, "registry", "promote", "demo/1", "production")
    assert rc == 1 and "weights.bin" in err
    rc, out, _ = run(capsys, *reg, "registry", "list", "demo", "--json")
    assert json.loads(out)[0]["aliases"] == []


def test_registry_show_unknown_version_exits_2(tmp_path, model_folder, capsys):
    reg = ["--registry", str(tmp_path / "reg")]
    assert run(capsys, *reg, "registry", "register", "demo", str(model_folder))[0] == 0
    rc, _, err = run(capsys, *reg, "registry", "show", "demo/7")
    assert rc == 2
    assert "no committed version 7" in error_line(err)


# -- sign-off -----------------------------------------------------------------------------------------


def test_signoff_separation_of_duties(tmp_path, model_folder, capsys):
    reg = ["--registry", str(tmp_path / "reg")]
    assert run(capsys, *reg, "registry", "register", "demo", str(model_folder))[0] == 0

    rc, out, err = run(capsys, *reg, "signoff", "request", "demo/1", "--user", "alice")
    assert rc == 0, err
    rc, out, _ = run(capsys, *reg, "signoff", "status", "demo/1", "--json")
    assert rc == 0 and json.loads(out)["state"] == "pending"

    rc, _, err = run(capsys, *reg, "signoff", "approve", "demo/1", "--user", "alice")
    assert rc == 1
    line = error_line(err)
    assert "alice" in line and "separation of duties" in line

    rc, out, err = run(
        capsys, *reg, "signoff", "approve", "demo/1", "--user", "bob", "--comment", "lgtm", "--json"
    )
    assert rc == 0, err
    assert json.loads(out)["state"] == "approved"

    rc, out, _ = run(capsys, *reg, "signoff", "status", "demo/1")
    assert rc == 0
    assert "approved" in out and "bob" in out


def test_signoff_reject_makes_status_exit_1(tmp_path, model_folder, capsys):
    reg = ["--registry", str(tmp_path / "reg")]
    assert run(capsys, *reg, "registry", "register", "demo", str(model_folder))[0] == 0
    assert run(capsys, *reg, "signoff", "request", "demo/1", "--user", "alice")[0] == 0
    rc, out, _ = run(capsys, *reg, "signoff", "reject", "demo/1", "--user", "bob", "--json")
    assert rc == 0 and json.loads(out)["state"] == "rejected"
    rc, out, _ = run(capsys, *reg, "signoff", "status", "demo/1", "--json")
    assert rc == 1 and json.loads(out)["state"] == "rejected"


def test_signoff_of_missing_version_exits_nonzero(tmp_path, capsys):
    rc, _, err = run(
        capsys, "--registry", str(tmp_path / "reg"), "signoff", "request", "ghost/1", "--user", "alice"
    )
    assert rc == 2
    assert "ghost" in error_line(err)


# -- evaluation ---------------------------------------------------------------------------------------

PREDICTIONS = [
    {"id": "a", "prediction": "The cat sat on the mat."},
    {"id": "b", "prediction": "forty-two"},
    {"id": "c", "prediction": "Paris is the capital of France"},
]
REFERENCES = [
    {"id": "a", "reference": "The cat is sitting on the mat."},
    {"id": "b", "references": ["forty-two", "42"]},
    {"id": "c", "reference": "The capital of France is Paris."},
]


def test_evaluate_score_matches_sacrebleu_and_rouge(tmp_path, capsys):
    import sacrebleu
    from rouge_score import rouge_scorer

    preds = write_jsonl(PREDICTIONS, tmp_path / "preds.jsonl")
    refs = write_jsonl(REFERENCES, tmp_path / "refs.jsonl")
    out_dir = tmp_path / "scores"
    rc, out, err = run(
        capsys,
        "evaluate",
        "score",
        "--predictions",
        str(preds),
        "--references",
        str(refs),
        "--out",
        str(out_dir),
        "--json",
    )
    assert rc == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    keys = {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match", "f1"}
    assert keys <= set(metrics)
    assert {k: json.loads(out)[k] for k in keys} == {k: metrics[k] for k in keys}

    hyps = [p["prediction"] for p in PREDICTIONS]
    ref_lists = [["The cat is sitting on the mat."], ["forty-two", "42"], ["The capital of France is Paris."]]
    streams = [[r[0] for r in ref_lists], [None, "42", None]]
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    best = [
        max((scorer.score(r, h) for r in refs_), key=lambda s: s["rougeL"].fmeasure)
        for h, refs_ in zip(hyps, ref_lists, strict=True)
    ]
    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert metrics[k] == pytest.approx(sum(s[k].fmeasure for s in best) / 3), k

    assert metrics["exact_match"] == pytest.approx(1 / 3)  # only "forty-two"
    assert [row["id"] for row in metrics["per_example"]] == ["a", "b", "c"]
    assert metrics["per_example"][1]["exact_match"] == 1.0 and metrics["per_example"][1]["f1"] == 1.0
    assert 0 < metrics["f1"] < 1


def test_evaluate_score_missing_prediction_exits_2(tmp_path, capsys):
    preds = write_jsonl(PREDICTIONS[:2], tmp_path / "preds.jsonl")
    refs = write_jsonl(REFERENCES, tmp_path / "refs.jsonl")
    rc, _, err = run(
        capsys,
        "evaluate",
        "score",
        "--predictions",
        str(preds),
        "--references",
        str(refs),
        "--out",
        str(tmp_path / "scores"),
    )
    assert rc == 2
    line = error_line(err)
    assert str(preds) in line and "'c'" in line
    assert not (tmp_path / "scores" / "metrics.json").exists()


def test_evaluate_score_bad_json_line_exits_2(tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"id": "a", "prediction": "x"}\n{oops\n')
    refs = write_jsonl(REFERENCES[:1], tmp_path / "refs.jsonl")
    rc, _, err = run(
        capsys,
        "evaluate",
        "score",
        "--predictions",
        str(preds),
        "--references",
        str(refs),
        "--out",
        str(tmp_path / "scores"),
    )
    assert rc == 2
    assert f"{preds}:2" in error_line(err)
