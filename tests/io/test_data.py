"""Reading the user's data files: text and JSONL seq2seq examples, with errors that name the file and line."""

from __future__ import annotations

import pytest

from moeconsol.errors import MoeconsolError
from moeconsol.io.data import read_seq2seq_data, read_text_data


def test_read_text_data(tmp_path):
    p = tmp_path / "wiki.txt"
    p.write_text("hello world\n", encoding="utf-8")
    assert read_text_data(p) == "hello world\n"
    with pytest.raises(MoeconsolError, match=r"missing\.txt: no such file"):
        read_text_data(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(MoeconsolError, match=r"blank\.txt: file is empty"):
        read_text_data(tmp_path / "blank.txt")
    with pytest.raises(MoeconsolError, match="not a file"):
        read_text_data(tmp_path)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(MoeconsolError, match="not UTF-8"):
        read_text_data(tmp_path / "latin1.txt")


def test_read_seq2seq_data(tmp_path):
    p = tmp_path / "ok.jsonl"
    p.write_text('{"input": "a", "target": "b", "id": 7}\n\n{"input": "c", "target": ""}\n')
    assert read_seq2seq_data(p) == [{"input": "a", "target": "b", "id": 7}, {"input": "c", "target": ""}]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"bad\.jsonl: file is empty"),
        ('{"input": "a", "target": "b"}\n{"input": "a", "target"\n', r"bad\.jsonl:2: invalid JSON"),
        ('{"input": "a"}\n', r'bad\.jsonl:1: missing field "target"'),
        (
            '{"input": "a", "target": "b"}\n\n{"input": 3, "target": "b"}\n',
            r'bad\.jsonl:3: field "input" must be a string, got int',
        ),
        ('["a", "b"]\n', r"bad\.jsonl:1: expected a JSON object"),
    ],
)
def test_read_seq2seq_data_errors(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(MoeconsolError, match=message):
        read_seq2seq_data(p)
    with pytest.raises(MoeconsolError, match=r"nope\.jsonl: no such file"):
        read_seq2seq_data(tmp_path / "nope.jsonl")
