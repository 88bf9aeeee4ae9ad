"""Streaming prompt files: ``.txt`` (one prompt a line), ``.jsonl``, ``.csv`` and ``.parquet``
with a ``prompt`` (or ``caption``) column and optional ``negative_prompt``, ``seed`` and
``control_image`` (``sdjax.generate --controlnet``: a file name relative to the table).

Files are read row by row and never held whole, so a 10-million-line file costs no memory.
Blank lines (txt, jsonl) are not rows; row numbers count the rows that remain, and a dataset's
sample ``row * K + k`` always refers to the same row of the same file.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath

from sdjax.dataset.storage import open_input
from sdjax.validation import MAX_SEED

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
PROMPT_COLUMNS = ("prompt", "caption")


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the line."""


@dataclasses.dataclass(frozen=True)
class Row:
    prompt: str
    negative_prompt: str | None = None  # None: the run's --negative_prompt
    seed: int | None = None             # None: the run's --seed
    # a control image's file name, relative to the prompt file (--controlnet); None: the
    # run's --control_image
    control_image: str | None = None


@dataclasses.dataclass(frozen=True)
class PromptsInfo:
    """What a validating pass learns: how many rows, and a fingerprint of the bytes (so a
    resumed run can tell that the file is still the one its shards were made from)."""
    num_rows: int
    sha256: str


def prompt_format(path: str) -> str:
    suffix = PurePosixPath(path).suffix.lower()
    if suffix not in FORMATS:
        raise PromptFileError(f"{path}: unsupported prompt file type {suffix or '(none)'!r}; "
                              f"use one of {', '.join(FORMATS)}")
    return suffix


def read_rows(path: str, digest: hashlib._Hash | None = None) -> Iterator[Row]:
    """Stream the rows of a prompt file; ``digest`` (if given) is fed every byte read."""
    fmt = prompt_format(path)
    if fmt == ".parquet":
        yield from _parquet_rows(path)
        return
    with open_input(path) as f:
        lines = _decoded_lines(path, f, digest)
        if fmt == ".txt":
            for _, line in lines:
                if line.strip():
                    yield Row(line.strip())
        elif fmt == ".jsonl":
            for number, line in lines:
                if line.strip():
                    yield _jsonl_row(path, number, line)
        else:
            yield from _csv_rows(path, lines)


def scan(path: str) -> PromptsInfo:
    """Read the whole file once: every row is checked (a bad line fails the run before any
    image is made), counted, and every byte hashed."""
    digest = hashlib.sha256()
    n = 0
    for _ in read_rows(path, digest):
        n += 1
    if prompt_format(path) == ".parquet":
        with open_input(path) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    if n == 0:
        raise PromptFileError(f"{path}: no prompts in the file")
    return PromptsInfo(n, digest.hexdigest())


def _decoded_lines(path: str, f, digest) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) with line endings kept (csv needs them inside quotes).
    UTF-8 never puts a newline byte inside a character, so decoding line by line is exact."""
    for number, raw in enumerate(f, 1):
        if digest is not None:
            digest.update(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PromptFileError(f"{path} line {number}: not UTF-8 text ({e.reason})") from None
        yield number, text.removeprefix("\ufeff") if number == 1 else text


def _row(path: str, where: str, record: dict) -> Row:
    column = next((c for c in PROMPT_COLUMNS if c in record), None)
    if column is None:
        raise PromptFileError(f"{path} {where}: no 'prompt' or 'caption' field")
    prompt = record[column]
    if not isinstance(prompt, str):
        raise PromptFileError(f"{path} {where}: {column} must be text, got "
                              f"{type(prompt).__name__}")
    negative = record.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise PromptFileError(f"{path} {where}: negative_prompt must be text, got "
                              f"{type(negative).__name__}")
    seed = record.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < MAX_SEED):
        raise PromptFileError(f"{path} {where}: seed must be an integer in [0, 2**32), got "
                              f"{seed!r}")
    control = record.get("control_image") or None
    if control is not None and (not isinstance(control, str) or "://" in control
                                or control.startswith(("/", "\\"))):
        raise PromptFileError(f"{path} {where}: control_image must be a file name relative "
                              f"to the prompt file, got {control!r}")
    return Row(prompt, negative, seed, control)


def _jsonl_row(path: str, number: int, line: str) -> Row:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path} line {number}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise PromptFileError(f"{path} line {number}: expected a JSON object with a 'prompt' "
                              "field")
    return _row(path, f"line {number}", record)


def _csv_rows(path: str, lines: Iterable[tuple[int, str]]) -> Iterator[Row]:
    numbered = iter(lines)
    line_no = [0]

    def text():
        for number, line in numbered:
            line_no[0] = number
            yield line

    # strict: an unterminated quote is an error, not a prompt that swallows the lines after it.
    reader = csv.DictReader(text(), strict=True)
    try:
        if reader.fieldnames is None:
            return  # an empty file; scan() reports it
        if not any(c in reader.fieldnames for c in PROMPT_COLUMNS):
            raise PromptFileError(f"{path}: the header has no 'prompt' or 'caption' column "
                                  f"(it has {', '.join(reader.fieldnames)})")
        for record in reader:
            if None in record or None in record.values():
                raise PromptFileError(f"{path} line {line_no[0]}: expected "
                                      f"{len(reader.fieldnames)} fields")
            # CSV has no null: an empty cell means "not given" (use the run's setting).
            seed = record.get("seed") or None
            if seed is not None:
                try:
                    seed = int(seed)
                except ValueError:
                    raise PromptFileError(f"{path} line {line_no[0]}: seed must be an "
                                          f"integer, got {seed!r}") from None
            record = {**record, "seed": seed,
                      "negative_prompt": record.get("negative_prompt") or None}
            yield _row(path, f"line {line_no[0]}", record)
    except csv.Error as e:
        reason = ("a quoted field is never closed (unterminated \")"
                  if "unexpected end of data" in str(e) else str(e))
        raise PromptFileError(f"{path} line {line_no[0]}: {reason}") from None


def _parquet_rows(path: str) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PromptFileError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), "
                              "or convert the file to .jsonl or .csv") from None
    with open_input(path) as f:
        try:
            table = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises its own error classes for corrupt files
            raise PromptFileError(f"{path}: not a readable parquet file ({e})") from None
        names = table.schema_arrow.names
        columns = [c for c in (*PROMPT_COLUMNS, "negative_prompt", "seed", "control_image")
                   if c in names]
        if not any(c in names for c in PROMPT_COLUMNS):
            raise PromptFileError(f"{path}: no 'prompt' or 'caption' column (it has "
                                  f"{', '.join(names)})")
        number = 0
        for batch in table.iter_batches(batch_size=65536, columns=columns):
            for record in batch.to_pylist():
                number += 1
                yield _row(path, f"row {number}", record)
