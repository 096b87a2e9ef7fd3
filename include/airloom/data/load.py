"""Read instruction records and conversations from JSONL, JSON, CSV or Parquet without letting one bad
row stop the read.

Every row that cannot become a record is reported as a :class:`Finding` (file, line, field, reason)
and kept out of ``records``; the read goes on. Only a file that cannot be opened at all is fatal.

Line numbers (``Finding.line`` and each record's ``_line``):

* JSONL: the 1-based physical line of the file.
* JSON array: the element's index + 1 (the message also gives the line where it starts).
* CSV: the 1-based data row; the header is not counted, so row 1 is the first row under it.
* Parquet: the 1-based row.

Sources are local (a file, a folder, a glob) or on S3 (``s3://bucket/key``, ``s3://bucket/prefix/``,
``s3://bucket/prefix/*.jsonl``); an S3 object is parsed exactly like a local file, and its findings
and records name its ``s3://`` URI.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

from airloom.data.chat import (
    CHAT_TARGETS,
    ChatLayout,
    conversation_problems,
    detect_layout,
    layout_from_field_map,
    read_turns,
    type_name,
)
from airloom.exceptions import UsageError
from airloom.prompts import chat_fields

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TEXT_FIELDS = ("instruction", "input", "response")
REQUIRED_FIELDS = ("instruction", "response")
CANONICAL_FIELDS = ("id", "instruction", "input", "response", "task")
#: The field-map target that reads a list of examples under one key as one row per example.
EXPAND = "expand"

#: Known source layouts, source key -> canonical key. One is chosen per file (see ``_pick_schema``).
SCHEMAS: dict[str, dict[str, str]] = {
    "airloom": {"instruction": "instruction", "input": "input", "response": "response"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "response"},
    "dolly": {"instruction": "instruction", "context": "input", "response": "response", "category": "task"},
    "prompt_completion": {"prompt": "instruction", "completion": "response"},
}

_ALIASES = {src: dst for schema in SCHEMAS.values() for src, dst in schema.items() if src != dst}
_RAW_KEEP = 20_000  # characters of a rejected row kept for the quarantine file
CHUNK_ROWS = 8192  # rows per chunk of a streamed read (see iter_chunks)


@dataclass
class Finding:
    """One problem found in the input, precise enough to fix by hand.

    Attributes:
        file: The file it is in.
        line: See the module docstring for what the number means per format; 0 = the whole file.
        field: The canonical field at fault, or None when the row as a whole is at fault.
        check: A stable short name (``invalid_json``, ``missing_field``, ``too_long`` …).
        message: What is wrong and what to change.
        severity: ``error`` keeps the row out of the accepted data; ``warning`` only reports.
    """

    file: str
    line: int
    field: str | None
    check: str
    message: str
    severity: str = "error"

    def to_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies and is ~10x slower, which shows at 100k findings
        return {
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "check": self.check,
            "message": self.message,
            "severity": self.severity,
        }

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" + (f" [{self.field}]" if self.field else "")
        return f"{where}: {self.check}: {self.message}"


@dataclass
class LoadResult:
    """What a read produced.

    ``rows_read == len(records) + len(rejected)`` always holds, so later stages can account for
    every row. Each record carries ``_file`` and ``_line`` so later findings can point back to it.
    """

    records: list[dict]
    findings: list[Finding]
    rows_read: int
    source: str
    rejected: list[dict] = field(default_factory=list)
    """Rows kept out of ``records``: ``{"file", "line", "raw", "reasons": [finding dicts]}``."""


def load_records(
    path: str | Path, field_map: dict[str, str] | None = None, *, s3_client: Any = None
) -> LoadResult:
    """Read every record from a file, a folder or a glob pattern, local or on S3.

    Args:
        path: A ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a folder (read recursively, hidden
            files skipped) or a glob pattern (``data/*.jsonl``, ``**`` allowed); each may also be an
            ``s3://bucket/...`` URI (an object, a prefix ending in ``/``, or a glob over keys).
        field_map: Source key -> canonical key (``instruction``, ``input``, ``response``, ``id``,
            ``task``), e.g. ``{"question": "instruction", "answer": "response"}``. Canonical keys not
            targeted by the map are still read as themselves. A chat layout is named with the targets
            ``messages`` (the list of turns), ``role``, ``content`` and role names (``{"bot":
            "assistant"}``): see :func:`airloom.data.chat.layout_from_field_map`; ``{KEY: "expand"}``
            reads a list of examples under ``KEY`` as one row each (its line shared). Without a map,
            each file's layout is recognised among :data:`SCHEMAS` (ours, Alpaca, Dolly,
            prompt/completion) and the chat layouts (OpenAI ``messages``, ShareGPT
            ``conversations``: :data:`airloom.data.chat.LAYOUTS`) from its first :data:`CHUNK_ROWS` rows.
        s3_client: The boto3 S3 client for ``s3://`` sources (Airflow tasks pass the one of their
            connection); None builds one as the registry does: boto3's credential chain, with
            ``AWS_ENDPOINT_URL`` honoured.

    Raises:
        UsageError: The path matches no readable file, or a file cannot be opened or decoded at all.
    """
    result = LoadResult(records=[], findings=[], rows_read=0, source=str(path))
    for chunk in iter_chunks(path, field_map, s3_client=s3_client):
        result.records.extend(chunk.records)
        result.findings.extend(chunk.findings)
        result.rejected.extend(chunk.rejected)
        result.rows_read += chunk.rows_read
    return result


def iter_chunks(
    path: str | Path,
    field_map: dict[str, str] | None = None,
    *,
    s3_client: Any = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[LoadResult]:
    """What :func:`load_records` reads, as consecutive chunks of at most ``chunk_rows`` rows.

    Local JSONL, CSV and Parquet files are read incrementally, so memory holds one chunk, not the
    corpus; a JSON array and an S3 object are read whole, then handed out in chunks. A chunk may hold
    no rows, only findings (the unknown keys of a file are reported after its last row).
    """
    text = str(path)
    sources = _resolve_s3(text, s3_client) if text.startswith("s3://") else _local_sources(path)
    if field_map is not None:
        _check_field_map(field_map)
    for source in sources:
        yield from _source_chunks(source, field_map, chunk_rows)


def fingerprint(path: str | Path) -> dict:
    """What identifies the data behind ``path`` now: each local file's name, size and modification
    time; for ``s3://`` the URI alone."""
    if str(path).startswith("s3://"):
        return {"source": str(path)}  # objects are taken as unchanged between the tasks of one run
    files = []
    for f in _resolve(path):
        st = f.stat()
        files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return {"source": str(path), "files": files}


class _Source(NamedTuple):
    """One file to parse: ``name`` is what findings and records cite (a path or an s3:// URI)."""

    name: str
    suffix: str
    read: Callable[[], bytes]
    path: Path | None = None  # local files: Parquet reads them in place


def _local_sources(path: str | Path) -> list[_Source]:
    return [_Source(str(f), f.suffix.lower(), lambda f=f: _read_bytes(f), f) for f in _resolve(path)]


def parse_field_map(value: Any) -> dict[str, str] | None:
    """A field map as users give it: a dict, JSON object text, or ``src=dst,src=dst`` text (source key =
    canonical key); None or empty means "recognise the layout". Checked."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise UsageError(f"field_map is not a JSON object: {exc}") from None
        else:
            pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
            if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
                raise UsageError(f"field_map: expected source=field pairs separated by commas, got {text!r}")
            value = {src.strip(): dst.strip() for src, dst in pairs}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise UsageError(f"field_map must map source keys to field names, got {value!r}")
    if not value:
        return None
    _check_field_map(value)
    return value


def _check_field_map(field_map: dict[str, str]) -> None:
    for src, dst in field_map.items():
        if dst not in (*CANONICAL_FIELDS, *CHAT_TARGETS, EXPAND):
            raise UsageError(
                f"field_map maps {src!r} to {dst!r}, which is not a record field; use one of "
                f"{', '.join(CANONICAL_FIELDS)}; for chats {', '.join(CHAT_TARGETS)}; or KEY={EXPAND} "
                "to read a list of examples under KEY as one row each"
            )
    if sum(dst == EXPAND for dst in field_map.values()) > 1:
        raise UsageError(f"field_map: only one key can be read with ={EXPAND}")
    try:
        layout_from_field_map(field_map)
    except ValueError as exc:
        raise UsageError(f"field_map: {exc}") from None


def _resolve(path: str | Path) -> list[Path]:
    text = str(path)
    if not Path(path).exists() and any(ch in text for ch in "*?["):
        # sorted by name as text, the order findings are reported in, so a streamed read already is
        matches = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
        files = [p for p in matches if p.is_file() and p.suffix.lower() in SUFFIXES]
        if not files:
            raise UsageError(f"{text}: the pattern matches no {'/'.join(SUFFIXES)} file")
        return files
    p = Path(path)
    if p.is_dir():
        files = sorted(
            (
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            ),
            key=str,
        )
        if not files:
            raise UsageError(f"{p}: the folder holds no {'/'.join(SUFFIXES)} file")
        return files
    if not p.exists():
        raise UsageError(f"{p}: no such file or folder")
    if p.suffix.lower() not in SUFFIXES:
        raise UsageError(f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(SUFFIXES)}")
    return [p]


def _resolve_s3(uri: str, client: Any) -> list[_Source]:
    """Objects behind an ``s3://`` URI: one key, every data file under a prefix, or a glob over keys."""
    from botocore.exceptions import BotoCoreError

    from airloom.exceptions import RegistryError
    from airloom.registry.store import S3Store

    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise UsageError(f"{uri}: no bucket; write s3://<bucket>/<key>, s3://<bucket>/<prefix>/ or a glob")
    # The registry's S3 store builds the client (credential chain + AWS_ENDPOINT_URL) and maps errors.
    store = S3Store(bucket, client=client)

    def source(k: str) -> _Source:
        return _Source(f"s3://{bucket}/{k}", Path(k).suffix.lower(), lambda: _s3_read(store, k))

    def listed(prefix: str) -> list[str]:
        try:
            return [k for k in store.list(prefix) if not k.endswith("/")]
        except RegistryError as exc:
            raise UsageError(f"{uri}: {exc}") from exc
        except BotoCoreError as exc:  # no response at all: no credentials, endpoint unreachable
            raise UsageError(f"{uri}: cannot reach S3 ({type(exc).__name__}: {exc})") from exc

    if any(ch in key for ch in "*?["):
        literal = key[: min(key.find(ch) for ch in "*?[" if ch in key)]
        pattern = key.split("/")
        keys = [
            k
            for k in listed(literal.rsplit("/", 1)[0] + "/" if "/" in literal else "")
            if Path(k).suffix.lower() in SUFFIXES and _glob_match(pattern, k.split("/"))
        ]
        if not keys:
            raise UsageError(f"{uri}: the pattern matches no {'/'.join(SUFFIXES)} object")
        return [source(k) for k in keys]
    if key and not key.endswith("/") and Path(key).suffix.lower() in SUFFIXES:
        return [source(key)]  # a missing object is reported when it is read
    prefix = key if not key or key.endswith("/") else key + "/"
    keys = [
        k
        for k in listed(prefix)
        if Path(k).suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in k[len(prefix) :].split("/"))
    ]
    if keys:
        return [source(k) for k in keys]
    if key and not key.endswith("/") and key in listed(key):
        raise UsageError(
            f"{uri}: unsupported file type {Path(key).suffix!r}; use one of {', '.join(SUFFIXES)}"
        )
    if listed(prefix):
        raise UsageError(f"{uri}: the prefix holds no {'/'.join(SUFFIXES)} object")
    raise UsageError(f"{uri}: no such S3 object or prefix")


def _s3_read(store: Any, key: str) -> bytes:
    from botocore.exceptions import BotoCoreError

    from airloom.exceptions import RegistryError

    try:
        got = store.get_with_etag(key)
    except RegistryError as exc:
        raise UsageError(f"{store.uri(key)}: cannot read the object ({exc})") from exc
    except BotoCoreError as exc:  # no response at all: no credentials, endpoint unreachable
        raise UsageError(f"{store.uri(key)}: cannot reach S3 ({type(exc).__name__}: {exc})") from exc
    if got is None:
        raise UsageError(f"{store.uri(key)}: no such S3 object")
    return got[0]


def _glob_match(pattern: list[str], parts: list[str]) -> bool:
    """``glob`` semantics on ``/``-separated keys: ``*`` stays within one part, ``**`` spans parts,
    and a wildcard does not match a hidden part (one starting with ``.``)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(
            _glob_match(pattern[1:], parts[i:])
            for i in range(len(parts) + 1)
            if not any(p.startswith(".") for p in parts[:i])
        )
    if not parts or (parts[0].startswith(".") and not pattern[0].startswith(".")):
        return False
    return fnmatchcase(parts[0], pattern[0]) and _glob_match(pattern[1:], parts[1:])


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise UsageError(f"{file}: cannot read the file ({exc.strerror or exc})") from exc


def _source_chunks(
    source: _Source, field_map: dict[str, str] | None, chunk_rows: int
) -> Iterator[LoadResult]:
    mapper = _Mapper(source.name, field_map)
    batch: list[_Row] = []
    for row in _source_rows(source):
        batch.append(row)
        if len(batch) >= chunk_rows:
            yield mapper.chunk(batch)
            batch = []
    chunk = mapper.chunk(batch)
    chunk.findings.extend(mapper.unknown_findings())
    yield chunk


def _source_rows(source: _Source) -> Iterator[_Row]:
    suffix = source.suffix
    if suffix == ".parquet":
        return _parquet_rows(source)
    if source.path is not None and suffix in (".jsonl", ".csv"):
        return _streamed_rows(source.path, suffix)
    return _text_rows(_decode(source.read()), suffix)


def _decode(data: bytes) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    # surrogateescape keeps undecodable bytes visible (as lone surrogates) so the bad field can be named.
    return data.decode("utf-8", errors="surrogateescape")


def _text_rows(text: str, suffix: str) -> Iterator[_Row]:
    return _csv_rows(io.StringIO(text, newline="")) if suffix == ".csv" else _json_rows(text, suffix)


def _streamed_rows(path: Path, suffix: str) -> Iterator[_Row]:
    """A local JSONL or CSV file, read as it is parsed (a JSONL file holding a JSON array is read whole)."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the with below, after the generator ends
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    with fh:
        head = fh.read(3)
        if head != b"\xef\xbb\xbf":
            fh.seek(0)
        if suffix == ".csv":
            text = io.TextIOWrapper(fh, encoding="utf-8", errors="surrogateescape", newline="")
            yield from _csv_rows(text)
            return
        first = fh.read(4096).lstrip()
        fh.seek(0 if head != b"\xef\xbb\xbf" else 3)
        if first.startswith(b"["):
            yield from _json_rows(_decode(fh.read()), suffix)
            return
        yield from _jsonl_lines(fh)


class _Row(NamedTuple):
    """One parsed row before mapping: ``obj`` is None when parsing failed (see ``problems``)."""

    line: int
    obj: Any
    raw: str | bytes  # bytes: a line parsed as read (decoded only if the row is rejected)
    problems: list[tuple[str | None, str, str]]  # (field, check, message)
    where: str = ""  # added to messages, e.g. where a JSON array element starts


def _json_rows(text: str, suffix: str) -> Iterator[_Row]:
    stripped = text.lstrip()
    if stripped.startswith("[") or suffix == ".json":
        try:
            data = json.loads(text, strict=False)
            parsed = True
        except json.JSONDecodeError:
            data, parsed = None, False
        if isinstance(data, list):
            yield from _array_rows(text, data)
            return
        if parsed and suffix == ".json" and "\n" in text.strip():
            yield _Row(1, data, text[:_RAW_KEEP], [])  # one pretty-printed value
            return
        if (
            not parsed
            and suffix == ".json"
            and stripped.startswith("[")
            and not _parses(stripped.split("\n", 1)[0])
        ):
            yield from _salvage_array(text)
            return
    yield from _jsonl_rows(text)


def _parses(text: str) -> bool:
    try:
        json.loads(text, strict=False)
    except json.JSONDecodeError:
        return False
    return True


def _jsonl_rows(text: str) -> Iterator[_Row]:
    *lines, last = text.split("\n")
    return _jsonl_lines(chain((line + "\n" for line in lines), [last]))


def _jsonl_lines(lines: Iterable[str | bytes]) -> Iterator[_Row]:
    """Rows of JSONL given as lines (text, or bytes as read) that keep their ``\\n`` (the last one may
    lack it: a cut-off file)."""
    fast = _fast_decoder()
    for n, line in enumerate(lines, start=1):
        terminated = line.endswith(b"\n" if isinstance(line, bytes) else "\n")
        if not terminated and not line:
            return
        if isinstance(line, bytes):
            # the common case, a good line: msgspec parses the bytes (and checks they are UTF-8) ~3x
            # faster than decoding + json.loads; anything it refuses takes the careful path below
            if fast is not None and line.strip():
                try:
                    yield _Row(n, fast(line), line, [])
                    continue
                except ValueError:  # msgspec.DecodeError is one
                    pass
            line = line.decode("utf-8", errors="surrogateescape")
        line = line.removesuffix("\n").removesuffix("\r")
        problems: list[tuple[str | None, str, str]] = []
        if not line.strip():
            problems.append((None, "blank_line", "blank line; remove it"))
            yield _Row(n, None, line, problems)
            continue
        try:
            obj = json.loads(line, strict=False)
        except json.JSONDecodeError as exc:
            if _has_surrogates(line):
                problems.append((None, "non_utf8", _non_utf8_message(line)))
            message = f"invalid JSON at column {exc.colno}: {exc.msg}"
            if exc.msg.startswith("Unterminated string") or exc.pos >= len(line.rstrip()) - 1:
                if not terminated:
                    message += (
                        "; the line ends before the JSON value does and the file ends without a newline:"
                        " the file was cut off (truncated)"
                    )
                else:
                    message += "; the line ends before the JSON value does (truncated?)"
            problems.append((None, "invalid_json", message))
            yield _Row(n, None, line, problems)
            continue
        yield _Row(n, obj, line, problems)


def _fast_decoder() -> Callable[[bytes], Any] | None:
    try:
        import msgspec
    except ImportError:  # a dependency of Airflow's task SDK; without it, json does all the work
        return None
    return msgspec.json.Decoder().decode


def _array_rows(text: str, data: list) -> Iterator[_Row]:
    starts = _element_lines(text, len(data))
    for i, obj in enumerate(data):
        raw = json.dumps(obj, ensure_ascii=False)[:_RAW_KEEP]
        yield _Row(i + 1, obj, raw, [], f" (element starts at line {starts[i]})" if starts else "")


def _element_lines(text: str, count: int) -> list[int]:
    """Source line where each top-level array element starts, for messages."""
    decoder = json.JSONDecoder(strict=False)
    pos = text.index("[") + 1
    lines: list[int] = []
    try:
        for _ in range(count):
            pos = _skip_ws(text, pos)
            lines.append(text.count("\n", 0, pos) + 1)
            _, pos = decoder.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if pos < len(text) and text[pos] == ",":
                pos += 1
    except (json.JSONDecodeError, ValueError):
        return []
    return lines


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _salvage_array(text: str) -> Iterator[_Row]:
    """Read the elements of a broken JSON array up to the point where it breaks."""
    decoder = json.JSONDecoder(strict=False)
    pos = _skip_ws(text, text.index("[") + 1)
    index = 0
    while pos < len(text) and text[pos] != "]":
        index += 1
        line = text.count("\n", 0, pos) + 1
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            err_line = text.count("\n", 0, exc.pos) + 1
            message = (
                f"invalid JSON in array element {index} (starts at line {line}, error at line {err_line}): "
                f"{exc.msg}; the rest of the file was not read"
            )
            yield _Row(index, None, text[pos : pos + _RAW_KEEP], [(None, "invalid_json", message)])
            return
        yield _Row(index, obj, text[pos:end][:_RAW_KEEP], [], f" (element starts at line {line})")
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            err_line = text.count("\n", 0, pos) + 1
            message = (
                f"expected ',' or ']' after array element {index} at line {err_line}; the rest was not read"
            )
            yield _Row(index + 1, None, text[pos : pos + _RAW_KEEP], [(None, "invalid_json", message)])
            return
    if pos >= len(text):
        yield _Row(
            index + 1, None, "", [(None, "invalid_json", "the JSON array is not closed (truncated file?)")]
        )


def _csv_rows(text: io.TextIOBase) -> Iterator[_Row]:
    """Rows of CSV read from ``text``, a text stream opened with ``newline=""``."""
    csv.field_size_limit(2**31 - 1)  # long responses are a validation finding, not a parse error
    reader = csv.reader(text)
    header: list[str] | None = None
    n = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            n += 1
            message = f"unreadable CSV row (file line {reader.line_num}): {exc}"
            yield _Row(n, None, "", [(None, "invalid_csv", message)])
            continue
        if header is None:
            header = [h.strip() for h in row]
            continue
        n += 1
        raw = ",".join(row)[:_RAW_KEEP]
        if not row or all(not cell.strip() for cell in row) and len(row) <= 1:
            yield _Row(
                n, None, raw, [(None, "blank_line", f"blank row (file line {reader.line_num}); remove it")]
            )
            continue
        if len(row) != len(header):
            message = f"{len(row)} columns where the header has {len(header)} (file line {reader.line_num})"
            yield _Row(n, None, raw, [(None, "wrong_column_count", message)])
            continue
        yield _Row(n, dict(zip(header, row, strict=True)), raw, [])


def _parquet_rows(source: _Source) -> Iterator[_Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path if source.path else pa.BufferReader(source.read()))
        batches = parquet.iter_batches(batch_size=CHUNK_ROWS)
        i = 0
        for batch in batches:
            for obj in batch.to_pylist():
                i += 1
                yield _Row(i, obj, json.dumps(obj, ensure_ascii=False, default=str)[:_RAW_KEEP], [])
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{source.name}: cannot read the Parquet file ({exc})") from exc


def _pick_schema(objects: list[dict], field_map: dict[str, str] | None) -> dict[str, str]:
    """Choose one source layout for the whole file, so a row with a stray key name is reported."""
    field_map = {src: dst for src, dst in (field_map or {}).items() if dst in CANONICAL_FIELDS} or None
    if field_map is not None:
        mapping = dict(field_map)
    else:
        best_name, best_score = "airloom", (-1, -1)
        for name, schema in SCHEMAS.items():
            required = [src for src, dst in schema.items() if dst in REQUIRED_FIELDS]
            complete = sum(1 for o in objects if all(k in o for k in required))
            hits = sum(1 for o in objects for k in schema if k in o)
            if (complete, hits) > best_score:
                best_name, best_score = name, (complete, hits)
        mapping = dict(SCHEMAS[best_name])
    targeted = set(mapping.values())
    for name in CANONICAL_FIELDS:
        if name not in targeted and name not in mapping:
            mapping[name] = name
    return mapping


class _Mapper:
    """Turns one file's parsed rows into records and findings, chunk by chunk.

    The layout (:data:`SCHEMAS`, or a chat layout: :mod:`airloom.data.chat`) is chosen once per
    file, from its first chunk, so a row with a stray key name is reported rather than read with
    another layout.
    """

    def __init__(self, file: str, field_map: dict[str, str] | None) -> None:
        self.file, self.field_map = file, field_map
        self.mapping: dict[str, str] | None = None
        self.chat: ChatLayout | None = None
        self.expand = next((src for src, dst in (field_map or {}).items() if dst == EXPAND), None)
        self.source_of: dict[str, str] = {}
        self.unknown: dict[str, list[int]] = {}  # key -> [first line, rows]

    def chunk(self, rows: list[_Row]) -> LoadResult:
        file = self.file
        if self.expand is not None:
            rows = [expanded for row in rows for expanded in _expand(row, self.expand)]
        if self.mapping is None and (rows or self.field_map is not None):
            objects = [row.obj for row in rows if isinstance(row.obj, dict)]
            self.mapping = _pick_schema(objects, self.field_map)
            self.chat = layout_from_field_map(self.field_map) if self.field_map else detect_layout(objects)
            self.source_of = {dst: src for src, dst in self.mapping.items()}
            if self.chat is not None:
                self.mapping[self.chat.field] = "messages"
            if self.expand is not None:
                self.mapping[self.expand] = EXPAND
        result = LoadResult(records=[], findings=[], rows_read=len(rows), source=file)
        for line, obj, raw, parse_problems, where in rows:
            problems = list(parse_problems)
            record = None
            if obj is not None or not problems:
                if isinstance(obj, dict):
                    record = _to_record(
                        obj, self.mapping, self.source_of, problems, self.unknown, line, self.chat
                    )
                else:
                    problems.append((None, "not_object", f"expected a JSON object, got {type_name(obj)}"))
            if problems:
                if isinstance(raw, bytes):  # a line msgspec parsed, rejected by the mapping
                    raw = raw.decode("utf-8", errors="surrogateescape").removesuffix("\n").removesuffix("\r")
                findings = [Finding(file, line, f, c, m + where) for f, c, m in problems]
                result.findings.extend(findings)
                result.rejected.append(
                    {
                        "file": file,
                        "line": line,
                        "raw": _printable(raw),
                        "reasons": [f.to_dict() for f in findings],
                    }
                )
            else:
                assert record is not None
                record["_file"] = file
                record["_line"] = line
                record["_chars"], record["_longest"] = _text_size(obj)
                result.records.append(record)
        return result

    def unknown_findings(self) -> list[Finding]:
        findings = []
        for key, (first, rows) in self.unknown.items():
            count = f"in {rows} rows, first here" if rows > 1 else "in this row only"
            findings.append(
                Finding(
                    self.file,
                    first,
                    key,
                    "unknown_field",
                    f"unknown key {key!r} ({count}) is ignored; rename it or pass field_map "
                    f"(known keys: {', '.join(sorted(self.mapping or {}))})",
                    severity="warning",
                )
            )
        return findings


def _expand(row: _Row, key: str) -> list[_Row]:
    """One row per element of ``row.obj[key]`` (each an object whose keys are added to the row's
    others, e.g. self-instruct's ``{"instruction", "instances": [{"input", "output"}]}``)."""
    obj = row.obj
    if not isinstance(obj, dict) or key not in obj:
        return [row]
    items, rest = obj[key], {k: v for k, v in obj.items() if k != key}
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        problem = (
            key,
            "wrong_type",
            f"{key} must be a non-empty list of objects to expand, got {type_name(items)}",
        )
        return [row._replace(obj=None, problems=[*row.problems, problem])]
    return [
        row._replace(obj={**rest, **item}, where=f"{row.where} ({key}[{i}])") for i, item in enumerate(items)
    ]


def _text_size(obj: Any, key: str = "") -> tuple[int, str]:
    """Characters of text in a parsed row, all keys and nested values included (the bound on a whole
    record sees what the loader ignores), and the top-level key holding the most."""
    if not isinstance(obj, dict):
        return _chars_in(obj), key
    total, longest, most = 0, "", -1
    for k, v in obj.items():
        n = _chars_in(v)
        total += n
        if n > most:
            longest, most = str(k), n
    return total, longest


def _chars_in(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars_in(v) for v in value.values())
    if isinstance(value, list):
        return sum(_chars_in(v) for v in value)
    return 0


def _to_record(
    obj: dict,
    mapping: dict[str, str],
    source_of: dict[str, str],
    problems: list,
    unknown: dict[str, list[int]],
    line: int,
    chat: ChatLayout | None = None,
) -> dict:
    record: dict[str, Any] = {}
    for key in obj:
        if key not in mapping:
            seen = unknown.setdefault(str(key), [line, 0])
            seen[1] += 1
    if chat is not None and chat.field not in obj and source_of.get("response") in obj:
        chat = None  # an instruction row in a chat file: read as one
    elif chat is None and source_of.get("response") not in obj:
        chat = detect_layout([obj])  # a conversation in a file of instruction rows
    if chat is not None:
        _read_chat(obj, chat, record, problems)
    for name in ("id", "task") if chat is not None else CANONICAL_FIELDS:
        src = source_of.get(name)
        present = src is not None and src in obj
        value = obj[src] if present else None
        label = name if src == name else f"{name} (from {src!r})"
        if not present:
            if name in REQUIRED_FIELDS:
                aliases = [k for k in obj if k not in mapping and _ALIASES.get(k) == name]
                hint = f"; the row has {aliases[0]!r}: rename it to {src or name!r}" if aliases else ""
                if not hint and name == "response" and (listed := _example_lists(obj)):
                    key, n = listed
                    hint = (
                        f"; it holds {n} examples under {key!r}: to read one row per example, pass "
                        f"field_map {key}={EXPAND} (--field-map {key}={EXPAND})"
                    )
                problems.append((name, "missing_field", f"required key {src or name!r} is missing{hint}"))
            elif name == "input":
                record["input"] = ""
            continue
        if value is None:
            if name in TEXT_FIELDS:
                hint = ' use "" for no input' if name == "input" else " give the text"
                problems.append((name, "null_field", f"{label} is null;{hint}"))
            continue
        if name in TEXT_FIELDS:
            if not isinstance(value, str):
                problems.append((name, "wrong_type", f"{label} must be text, got {type_name(value)}"))
            elif _has_surrogates(value):
                problems.append((name, "non_utf8", _non_utf8_message(value, label)))
            else:
                record[name] = value
        elif name == "id":
            if isinstance(value, bool) or not isinstance(value, str | int):
                problems.append(
                    (name, "wrong_type", f"{label} must be text or an integer, got {type_name(value)}")
                )
            else:
                record["id"] = str(value)
        elif name == "task":
            if not isinstance(value, str):
                problems.append((name, "wrong_type", f"{label} must be text, got {type_name(value)}"))
            elif value.strip():
                record["task"] = value.strip()
    return record


def _read_chat(obj: dict, layout: ChatLayout, record: dict, problems: list) -> None:
    """A chat row's turns into ``record["messages"]``, with the instruction view beside them
    (:func:`airloom.prompts.chat_fields`), or its problems, each naming the turn at fault."""
    if obj.get(layout.field) is None:
        what = "is missing" if layout.field not in obj else "is null"
        problems.append((layout.field, "missing_field", f"the list of turns {layout.field!r} {what}"))
        return
    turns, unreadable = read_turns(obj[layout.field], layout)
    if turns is None:
        problems.extend(unreadable)
        return
    bad = conversation_problems(turns, layout)
    for i, turn in enumerate(turns):
        if _has_surrogates(turn["content"]):
            key = f"{layout.field}[{i}].{layout.content_key}"
            bad.append((key, "non_utf8", _non_utf8_message(turn["content"], key)))
    if bad:
        problems.extend(bad)
        return
    record["messages"] = turns
    record.update(chat_fields(turns))
    record["_turn_key"] = f"{layout.field}[{{}}].{layout.content_key}"  # how findings name a turn


def _example_lists(obj: dict) -> tuple[str, int] | None:
    """(key, length) of a value that is a list of objects: examples grouped under one row."""
    for key, value in obj.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return str(key), len(value)
    return None


def _printable(text: str) -> str:
    """The raw row with undecodable bytes shown as U+FFFD, so it can be written out as UTF-8."""
    if not _has_surrogates(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_SURROGATE = re.compile("[\udc80-\udcff]")


def _has_surrogates(text: str) -> bool:
    # Called on every field of every row: a per-character Python loop here was most of a read's time.
    return not text.isascii() and _SURROGATE.search(text) is not None


def _non_utf8_message(text: str, label: str | None = None) -> str:
    bad = [ch for ch in text if "\udc80" <= ch <= "\udcff"]
    shown = " ".join(f"0x{ord(ch) - 0xDC00:02X}" for ch in bad[:6])
    where = f"{label} has" if label else "the line has"
    return f"{where} bytes that are not UTF-8 ({shown}); re-encode the file as UTF-8"
