import os

import numpy as np
import pytest

from bridge_data.preprocessing import PreprocessConfig, preprocess
from bridge_data.tokenizers import TokenizerConfig


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _cfg(tokenizer_dir, inputs, prefix, **kw):
    return PreprocessConfig(inputs=inputs, output_prefix=str(prefix), tokenizer=TokenizerConfig(path=tokenizer_dir),
                            progress=False, **kw)


def test_jsonl_documents_are_tokenizer_ids_plus_eod(tokenizer, tokenizer_dir, corpus_jsonl, tmp_path):
    path, texts = corpus_jsonl(40)
    [result] = preprocess(_cfg(tokenizer_dir, [path], tmp_path / "out" / "c"))
    docs = _read(result.prefix)
    assert docs == [tokenizer.hf_tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eod] for t in texts]
    assert (result.num_documents, result.num_tokens) == (40, sum(map(len, docs)))
    assert sorted(os.listdir(tmp_path / "out")) == ["c.bin", "c.idx"]


def test_parquet_and_hf_dir_give_the_same_documents(tokenizer_dir, corpus_jsonl, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    path, texts = corpus_jsonl(20)
    pq.write_table(pa.table({"text": texts}), str(tmp_path / "c.parquet"))
    Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    ref = _read(preprocess(_cfg(tokenizer_dir, [path], tmp_path / "j"))[0].prefix)
    assert _read(preprocess(_cfg(tokenizer_dir, [str(tmp_path / "c.parquet")], tmp_path / "p"))[0].prefix) == ref
    assert _read(preprocess(_cfg(tokenizer_dir, [str(tmp_path / "hf")], tmp_path / "h"))[0].prefix) == ref


def test_split_picks_a_datasetdict_split_and_is_refused_where_no_input_has_splits(tokenizer_dir, corpus_jsonl,
                                                                                 tmp_path):
    from datasets import Dataset, DatasetDict

    path, texts = corpus_jsonl(12)
    DatasetDict({"train": Dataset.from_dict({"text": texts}), "validation": Dataset.from_dict({"text": texts[:3]})}
                ).save_to_disk(str(tmp_path / "dd"))
    Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "one"))
    ref = _read(preprocess(_cfg(tokenizer_dir, [path], tmp_path / "j"))[0].prefix)
    [valid] = preprocess(_cfg(tokenizer_dir, [path, str(tmp_path / "dd")], tmp_path / "v", split="validation"))
    assert _read(valid.prefix) == ref + ref[:3]  # the JSONL whole, the DatasetDict's validation split
    for inputs in ([path], [str(tmp_path / "one")]):  # a file, a Dataset without splits: nothing to pick from
        with pytest.raises(ValueError, match=r"split 'validation' picks a split of an HF DatasetDict directory"):
            preprocess(_cfg(tokenizer_dir, inputs, tmp_path / "out" / "x", split="validation"))
        assert not (tmp_path / "out").exists()


def test_workers_write_the_same_bytes_as_one_process(tokenizer_dir, corpus_jsonl, tmp_path):
    path, _ = corpus_jsonl(60)
    preprocess(_cfg(tokenizer_dir, [path], tmp_path / "one"))
    preprocess(_cfg(tokenizer_dir, [path], tmp_path / "two", workers=2, chunk_size=7))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()


def test_several_text_keys_write_one_dataset_each(tokenizer, tokenizer_dir, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "what is it?", "a": "a fox."}, {"q": "who?", "a": "the dog"}])
    results = preprocess(_cfg(tokenizer_dir, [path], tmp_path / "qa", text_keys=["q", "a"]))
    assert [r.prefix for r in results] == [str(tmp_path / "qa_q"), str(tmp_path / "qa_a")]
    assert _read(results[1].prefix) == [tokenizer.tokenize(t) + [tokenizer.eod] for t in ("a fox.", "the dog")]


def test_eod_and_bos_are_configurable(tokenizer, tokenizer_dir, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello world"}])
    [r] = preprocess(_cfg(tokenizer_dir, [path], tmp_path / "c", append_eod=False, prepend_bos=True))
    assert _read(r.prefix) == [[tokenizer.bos] + tokenizer.tokenize("hello world")]


def test_several_inputs_are_concatenated_in_order(tokenizer, tokenizer_dir, tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "world"}, {"text": ""}])
    [r] = preprocess(_cfg(tokenizer_dir, [a, b], tmp_path / "ab"))
    assert _read(r.prefix) == [tokenizer.tokenize("hello") + [tokenizer.eod], tokenizer.tokenize("world") + [tokenizer.eod]]
    assert r.skipped_empty == 1


def test_null_tokenizer_writes_uint16_ids(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"text": "1 2 3"}, {"text": "7"}])
    cfg = PreprocessConfig(inputs=[path], output_prefix=str(tmp_path / "ids"), progress=False,
                           tokenizer=TokenizerConfig(tokenizer_type="null", vocab_size=10))
    [r] = preprocess(cfg)
    assert _read(r.prefix) == [[1, 2, 3, 9], [7, 9]]
    assert (tmp_path / "ids.bin").stat().st_size == 6 * np.dtype(np.uint16).itemsize


def test_missing_text_key_names_file_row_and_key(tokenizer_dir, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"text": "b"}, {"body": "c"}])
    with pytest.raises(ValueError, match=r"c.jsonl:3: no key 'text'; the row has keys \['body'\]"):
        preprocess(_cfg(tokenizer_dir, [path], tmp_path / "c"))


def test_non_string_text_is_rejected(tokenizer_dir, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": None}])
    with pytest.raises(ValueError, match=r"c.jsonl:1: key 'text' holds NoneType"):
        preprocess(_cfg(tokenizer_dir, [path], tmp_path / "c"))


def test_missing_input_raises_file_not_found(tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        preprocess(_cfg(tokenizer_dir, [str(tmp_path / "absent.jsonl")], tmp_path / "c"))


def test_empty_input_raises_and_writes_nothing(tokenizer_dir, tmp_path):
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="No documents"):
        preprocess(_cfg(tokenizer_dir, [str(path)], tmp_path / "out" / "c"))
    assert not (tmp_path / "out").exists()  # the output directory the run made is removed again


def test_failure_midway_leaves_no_partial_output(tokenizer_dir, tmp_path, write_jsonl):
    rows = [{"text": f"doc {i}"} for i in range(30)] + [{"body": "no text"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="c.jsonl:31"):
        preprocess(_cfg(tokenizer_dir, [path], tmp_path / "out" / "c", chunk_size=4))
    assert os.listdir(tmp_path / "out") == []


def test_failed_overwrite_keeps_previous_output(tokenizer_dir, corpus_jsonl, tmp_path, write_jsonl):
    good, _ = corpus_jsonl(10)
    [r] = preprocess(_cfg(tokenizer_dir, [good], tmp_path / "c"))
    before = _read(r.prefix)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}, {"other": "y"}])
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        preprocess(_cfg(tokenizer_dir, [bad], tmp_path / "c", overwrite=True))
    assert _read(r.prefix) == before
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith((".c", "c."))) == ["c.bin", "c.idx"]


def test_existing_output_is_kept_unless_overwrite(tokenizer, tokenizer_dir, tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "world"}])
    preprocess(_cfg(tokenizer_dir, [a], tmp_path / "c"))
    with pytest.raises(FileExistsError, match="overwrite"):
        preprocess(_cfg(tokenizer_dir, [b], tmp_path / "c"))
    [r] = preprocess(_cfg(tokenizer_dir, [b], tmp_path / "c", overwrite=True))
    assert _read(r.prefix) == [tokenizer.tokenize("world") + [tokenizer.eod]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"inputs": []}, "inputs is empty"), ({"text_keys": []}, "text_keys is empty"),
     ({"workers": 0}, "workers"), ({"output_prefix": "x.bin"}, "output_prefix")],
    ids=["no-inputs", "no-keys", "zero-workers", "prefix-with-suffix"],
)
def test_finalize_rejects_bad_config(tokenizer_dir, kwargs, message):
    cfg = dict(inputs=["x.jsonl"], output_prefix="out", tokenizer=TokenizerConfig(path=tokenizer_dir)) | kwargs
    with pytest.raises(ValueError, match=message):
        preprocess(PreprocessConfig(**cfg))
