"""Data files given by the user: plain text (perplexity, calibration of causal LMs) and JSONL
seq2seq examples (accuracy, calibration of encoder-decoders). Each reader names the file and
line of what is wrong, as a `SettingsError`."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SettingsError
from .safety import is_regular_file


def _read_nonempty(path: str | Path, what: str) -> tuple[Path, str]:
    p = Path(path)
    if not p.exists():
        raise SettingsError(f"{p}: no such file; give the path of a {what}")
    if not is_regular_file(p):
        raise SettingsError(f"{p}: not a file (a directory, FIFO or device); give the path of a {what}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SettingsError(f"{p}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8") from e
    if not text.strip():
        raise SettingsError(f"{p}: file is empty; give a {what} with some content")
    return p, text


def read_text_data(path: str | Path) -> str:
    """The whole of a UTF-8 text file, for `perplexity`; an empty or blank file is an error."""
    return _read_nonempty(path, "text file to measure perplexity on")[1]


def read_seq2seq_data(path: str | Path) -> list[dict]:
    """Examples from a JSONL file: one object per line with string fields "input" and "target".

    Blank lines are skipped; other fields are kept. Any other problem names the file and the
    (1-based) line.
    """
    p, text = _read_nonempty(path, 'JSONL file of {"input": ..., "target": ...} lines')
    examples = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SettingsError(f"{p}:{n}: invalid JSON ({e.msg}); each line must be one JSON object") from e
        if not isinstance(obj, dict):
            raise SettingsError(f'{p}:{n}: expected a JSON object with "input" and "target", got {type(obj).__name__}')
        for key in ("input", "target"):
            if key not in obj:
                raise SettingsError(f'{p}:{n}: missing field "{key}"; each line needs "input" and "target" strings')
            if not isinstance(obj[key], str):
                raise SettingsError(f'{p}:{n}: field "{key}" must be a string, got {type(obj[key]).__name__}')
        examples.append(obj)
    return examples
