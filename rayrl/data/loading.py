"""Reading dataset rows, each tagged with where it came from (file:line) for error messages."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rayrl.data import synthetic
from rayrl.tiny import BUILTIN_PREFIX


class DataError(ValueError):
    """A malformed dataset row or file: the message names the file, the line and the field."""


@dataclass(frozen=True)
class Row:
    fields: dict[str, Any]
    where: str  # "path:line" (JSONL), "path[index]" (JSON list, parquet, datasets)


def resolve_dataset_path(name: str) -> str:
    """A built-in ``rayrl:addition/<split>`` becomes a JSONL file in the cache (written on first use);
    any other name passes through."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    task, _, split = name[len(BUILTIN_PREFIX):].partition("/")
    if task != synthetic.TASK or split not in synthetic.SPLITS:
        valid = ", ".join(f"{BUILTIN_PREFIX}{synthetic.TASK}/{s}" for s in synthetic.SPLITS)
        raise DataError(f"unknown built-in dataset {name!r}; built-in datasets: {valid}")
    return str(synthetic.cached_split(split))


def read_rows(source: str) -> list[Row]:
    """Rows of a JSONL/JSON/parquet/CSV file, a `datasets` dataset directory or hub name, or a
    built-in ``rayrl:`` synthetic set."""
    path_text = resolve_dataset_path(source)
    path = Path(path_text)
    if path.suffix == ".jsonl" or (path.is_file() and path.suffix == ".json" and _starts_with_object(path)):
        return list(_read_jsonl(path))
    if path.suffix == ".json" and path.is_file():
        return _read_json_list(path)
    return _read_with_datasets(path_text)


def _starts_with_object(path: Path) -> bool:
    with path.open(errors="replace") as f:
        head = f.read(64).lstrip()
    return head.startswith("{")


def _read_jsonl(path: Path) -> Iterator[Row]:
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line = _utf8_line(raw, path, number)
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(fields, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(fields).__name__}")
            yield Row(fields, f"{path}:{number}")


def _utf8_line(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                        "datasets must be UTF-8") from None


def _read_json_list(path: Path) -> list[Row]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); datasets must be UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects (or JSONL), got {type(data).__name__}")
    rows = []
    for index, fields in enumerate(data):
        if not isinstance(fields, dict):
            raise DataError(f"{path}[{index}]: expected a JSON object, got {type(fields).__name__}")
        rows.append(Row(fields, f"{path}[{index}]"))
    return rows


def _read_with_datasets(source: str) -> list[Row]:
    import datasets  # slow: datasets (pyarrow, pandas); only for formats other than JSON/JSONL

    path = Path(source)
    try:
        if path.is_file():
            kind = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(path.suffix)
            if kind is None:
                raise DataError(f"{source}: unsupported file type {path.suffix!r} (use .jsonl, .json, .parquet, .csv)")
            dataset = datasets.load_dataset(kind, data_files=str(path), split="train")
        elif path.is_dir() and (path / "dataset_info.json").exists():
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.load_dataset(source, split="train")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the source and the reason
        raise DataError(f"could not load dataset {source!r}: {exc}") from None
    return [Row(dict(fields), f"{source}[{index}]") for index, fields in enumerate(dataset)]


def require_field(row: Row, name: str, kind: type | tuple[type, ...] = str) -> Any:
    """The value of a required field, or a DataError naming the file, line and field."""
    if name not in row.fields:
        present = ", ".join(sorted(row.fields)) or "none"
        raise DataError(f"{row.where}: missing field '{name}' (fields present: {present})")
    value = row.fields[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{row.where}: field '{name}' must be {expected}, got {type(value).__name__}")
    return value
