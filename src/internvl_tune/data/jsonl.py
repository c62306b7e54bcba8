"""Indexed, lazy reading of JSONL annotation files with line-accurate errors.

The file is scanned once for line offsets (no parsing), so opening a multi-million-line file is fast and each
record is parsed only when it is used. Every record comes back with its `file:line` for error messages. The index is
two arrays of 8-byte integers (16 bytes per record), which data-loader workers share with the main process: a forked
worker reads them without touching per-record Python objects, so they are never copied.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from internvl_tune.data.errors import DataError


class JsonlFile:
    """Random access to the non-blank lines of a JSONL file.

    Example:
        >>> f = JsonlFile("train.jsonl")  # doctest: +SKIP
        >>> record, where = f[0]  # ({"id": 0, "conversations": [...]}, "train.jsonl:1")  # doctest: +SKIP
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: annotation file not found")
        self._offsets = array("q")
        self._line_numbers = array("q")
        with open(self.path, "rb") as f:
            offset = 0
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    self._offsets.append(offset)
                    self._line_numbers.append(line_number)
                offset += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def where(self, index: int) -> str:
        """`file:line` of the index-th record."""
        return f"{self.path}:{self._line_numbers[index]}"

    def __getitem__(self, index: int) -> tuple[dict[str, Any], str]:
        with open(self.path, "rb") as f:
            f.seek(self._offsets[index])
            return parse_record(f.readline(), self.where(index))

    def span(self, start: int) -> tuple[int, int]:
        """(byte offset, line number) of record `start`: where `read_span` starts reading."""
        return self._offsets[start], self._line_numbers[start]


def read_span(
    path: Path, offset: int, line_number: int, count: int
) -> Iterator[tuple[dict[str, Any], str] | DataError]:
    """`count` records from the non-blank line at byte `offset` (line `line_number`) on, read sequentially: each as
    `(record, file:line)`, or the DataError a malformed one raises in `JsonlFile[i]` (so a reader can go on past it).

    A measuring worker gets only (path, offset, line number, count), never the records or the file's index.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        while count:
            line = f.readline()
            if line.strip():
                count -= 1
                try:
                    yield parse_record(line, f"{path}:{line_number}")
                except DataError as e:
                    yield e
            line_number += 1


def parse_record(line: bytes, where: str) -> tuple[dict[str, Any], str]:
    """One JSONL line as a record object, or the DataError naming `where`."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: malformed JSON line: {e}", "malformed JSON") from e
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}", "malformed JSON")
    return record, where
