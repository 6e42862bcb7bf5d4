from pathlib import Path

import pytest

from bridge_data.sources import count_rows, detect_format, get_field, iter_rows, read_rows


def _save_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def test_jsonl_rows_name_their_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(iter_rows(str(path))) == [(f"{path}:1", {"a": 1}), (f"{path}:3", {"a": 2})]


def test_parquet_and_hf_dir_rows_match_jsonl(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"text": f"row {i}", "n": i} for i in range(5)]
    parquet = _save_parquet(tmp_path / "d.parquet", rows)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hfdict"))
    for path in (parquet, str(tmp_path / "hf"), str(tmp_path / "hfdict")):
        assert [r for _, r in iter_rows(path)] == rows
        assert [r for _, r in iter_rows(path, columns=["text"])] == [{"text": r["text"]} for r in rows]
        assert count_rows(path) == 5
    assert [w for w, _ in iter_rows(parquet)][2] == f"{parquet} row 2"


def test_json_arrays_compressed_files_and_a_bom_read_like_jsonl(tmp_path, write_jsonl):
    """alpaca_data.json is one JSON array; datasets ship .jsonl.gz; Windows editors write a byte-order mark."""
    import bz2
    import gzip
    import json
    import lzma

    rows = [{"text": f"row {i}", "n": i} for i in range(4)]
    plain = write_jsonl(tmp_path / "d.jsonl", rows)
    lines = Path(plain).read_text(encoding="utf-8")
    (tmp_path / "array.json").write_text("\n  " + json.dumps(rows, indent=1))
    (tmp_path / "bom.jsonl").write_text(lines, encoding="utf-8-sig")
    for suffix, opener in ((".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)):
        with opener(tmp_path / f"d.jsonl{suffix}", "wt", encoding="utf-8") as f:
            f.write(lines)
    with gzip.open(tmp_path / "array.json.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(rows))
    for name in ("array.json", "bom.jsonl", "d.jsonl.gz", "d.jsonl.bz2", "d.jsonl.xz", "array.json.gz"):
        assert [r for _, r in iter_rows(str(tmp_path / name))] == rows, name
    assert [w for w, _ in iter_rows(str(tmp_path / "array.json"))][1] == f"{tmp_path / 'array.json'} item 1"
    assert [w for w, _ in iter_rows(str(tmp_path / "d.jsonl.gz"))][1] == f"{tmp_path / 'd.jsonl.gz'}:2"
    (tmp_path / "latin1.jsonl").write_bytes(lines.encode() + '{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl:5: not UTF-8 text \(invalid continuation byte at byte 13 "):
        list(iter_rows(str(tmp_path / "latin1.jsonl")))  # the line is named (only the file was)
    (tmp_path / "mixed.json").write_text(json.dumps([rows[0], [1]]))
    with pytest.raises(ValueError, match=r"mixed.json item 1: expected a JSON object in the array, got list"):
        list(iter_rows(str(tmp_path / "mixed.json")))
    (tmp_path / "broken.json").write_text('[{"a": 1},\n {"a": ')
    with pytest.raises(ValueError, match=r"broken.json:2: invalid JSON"):
        list(iter_rows(str(tmp_path / "broken.json")))
    whole = gzip.compress("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5000)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # a download that stopped half-way
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: cannot read it \(Compressed file ended"):
        list(iter_rows(str(tmp_path / "cut.jsonl.gz")))
    (tmp_path / "lines.jsonl").write_text("[1, 2]\n")  # a .jsonl file is JSON Lines, whatever its first character
    with pytest.raises(ValueError, match=r"lines.jsonl:1: expected a JSON object per line"):
        list(iter_rows(str(tmp_path / "lines.jsonl")))


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        list(iter_rows(str(path)))


def test_non_object_json_line_is_rejected(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(ValueError, match=r"list.jsonl:1: expected a JSON object"):
        list(iter_rows(path))


def test_missing_input_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        list(iter_rows(str(tmp_path / "absent.jsonl")))


@pytest.mark.parametrize("name", ["data.csv", "plain_dir"], ids=["unknown-suffix", "non-hf-dir"])
def test_unknown_format_is_rejected(tmp_path, name):
    path = tmp_path / name
    path.mkdir() if name == "plain_dir" else path.write_text("x")
    with pytest.raises(ValueError, match=name):
        detect_format(str(path))


def test_missing_column_lists_available_columns(tmp_path):
    parquet = _save_parquet(tmp_path / "d.parquet", [{"body": "x"}])
    with pytest.raises(ValueError, match=r"no column\(s\) \['text'\].*\['body'\]"):
        list(iter_rows(parquet, columns=["text"]))


def test_missing_hf_split_lists_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"validation": Dataset.from_list([{"text": "a"}])}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"\['validation'\], not 'train'"):
        list(iter_rows(str(tmp_path / "hf")))


def test_read_rows_rejects_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl.*no rows"):
        read_rows(str(path))


def test_get_field_names_row_and_key():
    with pytest.raises(ValueError, match=r"f.jsonl:3: no key 'text'; the row has keys \['body'\]"):
        get_field({"body": "x"}, "text", "f.jsonl:3")
    with pytest.raises(ValueError, match=r"f.jsonl:3: key 'text' holds int, expected str"):
        get_field({"text": 5}, "text", "f.jsonl:3")
