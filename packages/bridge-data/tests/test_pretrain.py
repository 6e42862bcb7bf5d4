import numpy as np
import pytest
import torch

from bridge_data.preprocessing import PreprocessConfig, preprocess
from bridge_data.pretrain import PretrainDataConfig, check_indexed_dataset
from bridge_data.tokenizers import NullTokenizer, TokenizerConfig

SEQ = 16


@pytest.fixture(scope="module")
def indexed_corpus(tmp_path_factory, tokenizer_dir, make_texts, write_jsonl):
    """(prefix, texts) of a 60-document corpus preprocessed with the test tokenizer."""
    tmp = tmp_path_factory.mktemp("indexed")
    texts = make_texts(60, seed=3)
    path = write_jsonl(tmp / "c.jsonl", [{"text": t} for t in texts])
    preprocess(PreprocessConfig(inputs=[path], output_prefix=str(tmp / "c"), progress=False,
                                tokenizer=TokenizerConfig(path=tokenizer_dir)))
    return str(tmp / "c"), texts


def _null_corpus(tmp_path, write_jsonl, name, low, high, n=80, seed=0):
    """An indexed dataset of ``n`` documents whose ids all lie in [low, high) (null tokenizer, eod 99)."""
    rng = np.random.default_rng(seed)
    rows = [{"text": " ".join(map(str, rng.integers(low, high, size=rng.integers(3, 12))))} for _ in range(n)]
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    preprocess(PreprocessConfig(inputs=[path], output_prefix=str(tmp_path / name), progress=False,
                                tokenizer=TokenizerConfig(tokenizer_type="null", vocab_size=100)))
    return str(tmp_path / name)


def test_gpt_dataset_yields_tokenizer_ids_with_eod_boundaries(indexed_corpus, tokenizer, tmp_path):
    prefix, texts = indexed_corpus
    cfg = PretrainDataConfig(paths=[prefix], seq_length=SEQ, split="100,0,0", cache_dir=str(tmp_path))
    train, valid, test = cfg.build(tokenizer, train_samples=None, valid_samples=None, test_samples=None)
    assert valid is None and test is None
    docs = [tokenizer.hf_tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eod] for t in texts]
    gpt = train.megatron_dataset
    # megatron-core concatenates the documents in document_index order and cuts sample j at j * SEQ.
    stream = np.concatenate([docs[d] for d in gpt.document_index])
    assert len(train) == (len(stream) - 1) // SEQ
    for i in range(len(train)):
        sample = train[i]
        j = int(gpt.shuffle_index[i])
        assert sample["tokens"].tolist() == stream[j * SEQ : (j + 1) * SEQ].tolist()
        assert sample["labels"].tolist() == stream[j * SEQ + 1 : (j + 1) * SEQ + 1].tolist()
        assert sample["loss_mask"].tolist() == [1.0] * SEQ
        assert sample["position_ids"].tolist() == list(range(SEQ))
    assert sorted(int(d) for d in gpt.document_index) == list(range(len(texts)))


def test_samples_follow_the_contract(indexed_corpus, tokenizer, tmp_path):
    prefix, _ = indexed_corpus
    cfg = PretrainDataConfig(paths=[prefix], seq_length=SEQ, split="80,10,10", cache_dir=str(tmp_path))
    train, valid, test = cfg.build(tokenizer, train_samples=20, valid_samples=2, test_samples=2)
    assert len(train) >= 20 and len(valid) >= 1 and len(test) >= 1
    sample = train[0]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
    dtypes = {k: v.dtype for k, v in sample.items()}
    assert dtypes == {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
                      "position_ids": torch.int64}
    assert all(v.shape == (SEQ,) for v in sample.values())


def test_build_is_deterministic_under_seed(indexed_corpus, tokenizer, tmp_path):
    prefix, _ = indexed_corpus

    def first_tokens(seed, cache):
        cfg = PretrainDataConfig(paths=[prefix], seq_length=SEQ, seed=seed, split="80,10,10",
                                 cache_dir=str(tmp_path / cache))
        train, _, _ = cfg.build(tokenizer, train_samples=30, valid_samples=2, test_samples=2)
        return [train[i]["tokens"].tolist() for i in range(30)]

    assert first_tokens(7, "a") == first_tokens(7, "b")
    assert first_tokens(7, "a") != first_tokens(8, "c")


def test_blend_respects_weights(tmp_path, write_jsonl):
    low = _null_corpus(tmp_path, write_jsonl, "low", 0, 50, seed=1)
    high = _null_corpus(tmp_path, write_jsonl, "high", 50, 99, seed=2)
    cfg = PretrainDataConfig(paths=[low, high], weights=[0.25, 0.75], seq_length=8, split="90,5,5",
                             cache_dir=str(tmp_path / "cache"))
    train, _, _ = cfg.build(NullTokenizer(100), train_samples=400, valid_samples=20, test_samples=20)
    assert len(train) == 400
    from_low = 0
    for i in range(len(train)):
        ids = train[i]["tokens"][train[i]["tokens"] != 99]
        assert bool((ids < 50).all()) or bool((ids >= 50).all())  # every sample comes from one dataset
        from_low += bool((ids < 50).all())
    assert abs(from_low / 400 - 0.25) < 0.02


def test_mock_data_is_random_deterministic_and_sized():
    tok = NullTokenizer(128)

    def build(seed):
        return PretrainDataConfig(seq_length=32, seed=seed).build(tok, train_samples=24, valid_samples=4,
                                                                   test_samples=4)

    train, valid, test = build(5)
    assert PretrainDataConfig(seq_length=32).mock is False
    assert len(train) >= 24 and len(valid) >= 4 and len(test) >= 4
    tokens = torch.stack([train[i]["tokens"] for i in range(24)])
    assert tokens.shape == (24, 32) and int(tokens.max()) < 128
    assert (tokens == tok.eod).any()  # document boundaries inside samples
    assert len(torch.unique(tokens)) > 100  # random ids, not megatron-core's counting sequences
    again, _, _ = build(5)
    assert torch.equal(tokens, torch.stack([again[i]["tokens"] for i in range(24)]))
    other, _, _ = build(6)
    assert not torch.equal(tokens, torch.stack([other[i]["tokens"] for i in range(24)]))


def test_document_attention_marks_eod_boundaries():
    tok = NullTokenizer(64)
    train, _, _ = PretrainDataConfig(seq_length=48, document_attention=True).build(
        tok, train_samples=16, valid_samples=1, test_samples=1)
    for i in range(16):
        sample = train[i]
        cu = sample["cu_seqlens"].tolist()
        assert sample["cu_seqlens"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == 48
        ends = [p + 1 for p in torch.nonzero(sample["tokens"] == tok.eod).flatten().tolist() if p + 1 < 48]
        assert cu[1:-1] == ends
        for start, end in zip(cu[:-1], cu[1:]):
            assert sample["position_ids"][start:end].tolist() == list(range(end - start))


def test_eod_mask_loss_masks_eod_inputs():
    tok = NullTokenizer(64)
    train, _, _ = PretrainDataConfig(seq_length=48, eod_mask_loss=True).build(
        tok, train_samples=4, valid_samples=1, test_samples=1)
    sample = train[0]
    assert torch.equal(sample["loss_mask"] == 0, sample["tokens"] == tok.eod)


def test_missing_bin_raises_file_not_found(indexed_corpus, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent.*missing \[.*absent.bin"):
        PretrainDataConfig(paths=[str(tmp_path / "absent")], seq_length=SEQ).build(
            tokenizer, train_samples=1, valid_samples=1, test_samples=1)
    # finalize() alone (what a training config check runs, before any model is built) says it too
    with pytest.raises(FileNotFoundError, match=r"absent.*missing \[.*absent.bin"):
        PretrainDataConfig(paths=[str(tmp_path / "absent")], seq_length=SEQ).finalize()


def test_an_unwritable_index_cache_is_named_with_the_fix(indexed_corpus, tokenizer, tmp_path, monkeypatch):
    """Read-only data: megatron-core's default cache lies beside the prefix. A cache directory that cannot be created
    is refused by finalize() (before a model is built); a write that fails later names the cache and the fix instead
    of megatron-core's traceback from os.makedirs."""
    import errno

    import megatron.core.datasets.gpt_dataset as gpt_dataset

    prefix, _ = indexed_corpus
    (tmp_path / "a_file").write_text("")
    blocked = PretrainDataConfig(paths=[prefix], seq_length=SEQ, split="100,0,0",
                                 cache_dir=str(tmp_path / "a_file" / "cache"))
    with pytest.raises(PermissionError, match=r"sample-index cache .*a_file/cache: .*a_file is not a directory.*"
                                              r"dataset.cache_dir="):
        blocked.finalize()

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(gpt_dataset.os, "makedirs", read_only)
    with pytest.raises(OSError, match=r"sample-index cache .*ro_cache: Read-only file system.*dataset.cache_dir="):
        PretrainDataConfig(paths=[prefix], seq_length=SEQ, split="100,0,0", cache_dir=str(tmp_path / "ro_cache")).build(
            tokenizer, train_samples=None, valid_samples=None, test_samples=None)


def test_data_rewritten_under_the_same_prefix_is_not_sampled_by_the_old_cached_indices(tmp_path, write_jsonl,
                                                                                        tokenizer):
    """megatron-core's cache key held the paths, seed, lengths and tokenizer, not the data: after
    `preprocess --overwrite` the old data's sample indices were reused (its length, samples cut at the old bounds)."""
    prefix = _null_corpus(tmp_path, write_jsonl, "c", 0, 99, n=80, seed=0)
    null = NullTokenizer(vocab_size=100)

    def build(cache):
        return PretrainDataConfig(paths=[prefix], seq_length=SEQ, split="100,0,0", cache_dir=str(cache)).build(
            null, train_samples=None, valid_samples=None, test_samples=None)[0]

    old = build(tmp_path / "cache")
    rows = [{"text": " ".join(["7"] * (2 + i % 3))} for i in range(80)]  # the same count, shorter documents
    preprocess(PreprocessConfig(inputs=[write_jsonl(tmp_path / "new.jsonl", rows)], output_prefix=prefix,
                                progress=False, overwrite=True,
                                tokenizer=TokenizerConfig(tokenizer_type="null", vocab_size=100)))
    again, fresh = build(tmp_path / "cache"), build(tmp_path / "fresh-cache")
    assert len(again) == len(fresh) != len(old)
    assert all(torch.equal(again[i]["tokens"], fresh[i]["tokens"]) for i in range(len(fresh)))


def test_a_truncated_bin_is_refused_naming_it(tmp_path, write_jsonl):
    """A .bin cut short (an interrupted copy) passed the check and failed at the first sample read with numpy's
    'offset must be non-negative and no greater than buffer length'."""
    prefix = _null_corpus(tmp_path, write_jsonl, "c", 0, 99)
    data = (tmp_path / "c.bin").read_bytes()
    (tmp_path / "c.bin").write_bytes(data[:len(data) - 2])
    with pytest.raises(ValueError, match=rf"c\.bin is truncated \({len(data) - 2:,} bytes; its \.idx indexes "
                                         rf"{len(data):,}\)"):
        PretrainDataConfig(paths=[prefix], seq_length=SEQ).finalize()


def test_token_sizes_follow_megatron_cores_dtype_codes():
    from megatron.core.datasets.indexed_dataset import DType

    from bridge_data.pretrain import _ITEM_SIZES

    assert {code.value: DType.size(code.value) for code in DType} == _ITEM_SIZES


def test_empty_indexed_dataset_is_rejected(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "e.bin"))
    builder.finalize(str(tmp_path / "e.idx"))
    with pytest.raises(ValueError, match="holds no documents"):
        check_indexed_dataset(str(tmp_path / "e"))


def test_corrupt_index_is_rejected(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"")
    (tmp_path / "x.idx").write_bytes(b"not an index file at all, certainly not")
    with pytest.raises(ValueError, match="not a megatron-core index"):
        check_indexed_dataset(str(tmp_path / "x"))


def test_split_without_documents_is_rejected(indexed_corpus, tokenizer):
    prefix, _ = indexed_corpus  # 60 documents: "98,1,1" leaves valid and test empty
    with pytest.raises(ValueError, match=r"leaves the valid split of .* \(60 documents\) empty"):
        PretrainDataConfig(paths=[prefix], seq_length=SEQ, split="98,1,1").build(
            tokenizer, train_samples=10, valid_samples=1, test_samples=1)


def test_weights_need_sample_counts(indexed_corpus, tokenizer):
    prefix, _ = indexed_corpus
    with pytest.raises(ValueError, match="weights needs train_samples"):
        PretrainDataConfig(paths=[prefix, prefix], weights=[1, 1], seq_length=SEQ).build(
            tokenizer, train_samples=None, valid_samples=1, test_samples=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"weights": [1.0]}, "1 entries for 2 paths"), ({"weights": [1.0, 0.0]}, "must all be > 0"),
     ({"split": "a,b"}, "split must be")],
    ids=["weight-count", "zero-weight", "bad-split"],
)
def test_finalize_rejects_bad_blend(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PretrainDataConfig(paths=["a", "b"], seq_length=SEQ, **kwargs).finalize()


def test_fields_assigned_after_construction_are_checked_at_finalize():
    """Overrides assign fields after __init__ (dataset.seq_length=0 passed finalize() before)."""
    cfg = PretrainDataConfig(seq_length=SEQ)
    cfg.seq_length, cfg.num_dataset_builder_threads = 0, 0
    with pytest.raises(ValueError, match="seq_length must be >= 1, got 0; num_dataset_builder_threads must be >= 1"):
        cfg.finalize()


def test_mock_with_paths_is_refused():
    cfg = PretrainDataConfig(paths=["a"], seq_length=SEQ, mock=True)
    with pytest.raises(ValueError, match=r"mock is True and paths is set \(\['a'\]\): real data and random mock"):
        cfg.finalize()


def test_mock_data_refuses_what_only_real_data_reads(tmp_path):
    cfg = PretrainDataConfig(seq_length=SEQ, weights=[1.0], split="100,0,0", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"weights=\[1.0\], split='100,0,0', cache_dir='.*' applies to real data "
                                         r"\(paths\), not to mock data"):
        cfg.finalize()  # mock: no paths
