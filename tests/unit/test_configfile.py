"""load_yaml_mapping: the one YAML-mapping loader; each failure is a UsageError naming the file."""

from __future__ import annotations

import pytest

from airloom.configfile import load_yaml_mapping
from airloom.exceptions import UsageError


def test_reads_a_mapping_and_an_empty_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\nb: [x]\n")
    assert load_yaml_mapping(path) == {"a": 1, "b": ["x"]}
    path.write_text("")
    assert load_yaml_mapping(path) == {}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, r"nope\.yaml: cannot read training config \("),
        ("a: [1, 2\n", r"nope\.yaml: not valid YAML \("),
        ("- 1\n- 2\n", r"nope\.yaml: training config must be a mapping, got list"),
    ],
)
def test_errors_name_the_file(tmp_path, text, match):
    path = tmp_path / "nope.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UsageError, match=match):
        load_yaml_mapping(path, "training config")
