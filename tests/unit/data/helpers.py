"""Shared helpers of the data tests."""

from __future__ import annotations

from pathlib import Path

from airloom.data.load import LoadResult
from airloom.data.validate import ValidationConfig, ValidationResult, validate_stream
from airloom.exceptions import UsageError


def validate_load(
    load: LoadResult, out_dir: Path, config: ValidationConfig | None = None
) -> ValidationResult:
    """Run the suite over ``load.records`` (all in memory, one chunk); see :func:`validate_stream`."""
    if load.rows_read != len(load.records) + len(load.rejected):
        raise UsageError(
            f"{load.source}: rows_read is {load.rows_read} but there are {len(load.records)} records and "
            f"{len(load.rejected)} rejected rows; pass what load_records returned"
        )
    return validate_stream(lambda: [load], out_dir, config, source=load.source)
