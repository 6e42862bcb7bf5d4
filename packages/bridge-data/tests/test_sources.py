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
