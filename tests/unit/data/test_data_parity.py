"""Parity of the data stage (issue #14): ``airloom validate``, ``eda --scan`` and ``prepare`` give the same
findings, counts and profile numbers on the shipped corpora as the code that wrote
``tests/fixtures/parity/golden/`` (how to regenerate it: tests/fixtures/parity/make_golden.py)."""

from __future__ import annotations

import copy
import json

import pytest

from tests.fixtures.parity import make_golden


@pytest.mark.parametrize("name", list(make_golden.CORPORA))
def test_same_findings_counts_and_profile_as_the_golden(name, tmp_path):
    expected = json.loads(make_golden.golden_path(name).read_text("utf-8"))
    got = make_golden.run_corpus(make_golden.CORPORA[name], tmp_path)
    differences = make_golden.compare(expected, got)
    assert not differences, f"{name}: {len(differences)} difference(s) from the golden:\n" + "\n".join(
        differences[:60]
    )


def test_the_comparison_names_what_differs():
    """compare() is the test's eye: a changed count, a float beyond the tolerance, a changed finding, a lost row and a new
    key are each reported by their key; a float within 1e-9 (relative) is not."""
    golden = json.loads(make_golden.golden_path("instruct_corrupt").read_text("utf-8"))
    assert make_golden.compare(golden, copy.deepcopy(golden)) == []
    got = copy.deepcopy(golden)
    got["validation"]["quarantined"] += 1
    got["profile"]["fields"]["response"]["chars"]["mean"] *= 1 + 1e-6
    got["profile"]["fields"]["input"]["chars"]["mean"] *= 1 + 1e-12
    got["validation"]["findings"][3][3] = "another_check"
    got["quarantine"].pop()
    got["manifest"]["counts"]["extra"] = 0
    differences = make_golden.compare(golden, got)
    assert differences == [
        f".validation.quarantined: expected {golden['validation']['quarantined']}, "
        f"got {golden['validation']['quarantined'] + 1}",
        f'.validation.findings[3][3]: expected "{golden["validation"]["findings"][3][3]}", '
        'got "another_check"',
        f".quarantine: {len(golden['quarantine'])} items expected, got {len(golden['quarantine']) - 1}",
        f".profile.fields.response.chars.mean: expected {golden['profile']['fields']['response']['chars']['mean']!r}, "
        f"got {got['profile']['fields']['response']['chars']['mean']!r}",
        ".manifest.counts.extra: unexpected key (got 0)",
    ]
