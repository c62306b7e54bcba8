"""Indexed, lazy reading of JSONL annotation files with line-accurate errors.

The file is scanned once for line offsets (no parsing), so opening a multi-million-line file is fast and each
record is parsed only when it is used. Every record comes back with its `file:line` for error messages.
"""

from __future__ import annotations

import json
from array import array
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
        where = self.where(index)
        with open(self.path, "rb") as f:
            f.seek(self._offsets[index])
            line = f.readline()
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: malformed JSON line: {e}", "malformed JSON") from e
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}", "malformed JSON")
        return record, where
