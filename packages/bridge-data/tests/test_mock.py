import numpy as np

from bridge_data.mock import RandomDocuments


def test_random_documents_end_in_eod_only_and_repeat_exactly():
    docs = RandomDocuments(vocab_size=50, eod=7, seed=3, seq_length=8, num_documents=200)
    again = RandomDocuments(vocab_size=50, eod=7, seed=3, seq_length=8, num_documents=200)
    for i in range(200):
        doc = docs[i]
        assert len(doc) == docs.sequence_lengths[i] and 1 <= len(doc) <= 16
        assert doc[-1] == 7 and 7 not in doc[:-1].tolist()
        assert doc.min() >= 0 and doc.max() < 50
        assert np.array_equal(doc, again[i])
    assert np.array_equal(docs.get(5, offset=1, length=2), docs[5][1:3])


def test_random_documents_cover_the_vocabulary_uniformly():
    docs = RandomDocuments(vocab_size=20, eod=19, seed=0, seq_length=64, num_documents=100)
    ids = np.concatenate([docs[i][:-1] for i in range(100)])
    counts = np.bincount(ids, minlength=20)
    assert counts[19] == 0
    assert counts[:19].min() > 0.7 * counts[:19].mean()


def test_random_documents_step_by_one_to_three_so_there_is_something_to_learn():
    docs = RandomDocuments(vocab_size=20, eod=5, seed=1, seq_length=64, num_documents=50)
    for i in range(50):
        body = docs[i][:-1]
        dense = np.where(body > 5, body - 1, body)  # undo the skip over eod
        steps = np.diff(dense) % 19
        assert set(steps.tolist()) <= {1, 2, 3}


def test_random_documents_skip_the_pad_id_too():
    """megatron-core masks the pad id out of the loss and zeroes it: mock documents held it ~9% of the time."""
    docs = RandomDocuments(vocab_size=20, eod=1, pad=2, seed=0, seq_length=64, num_documents=100)
    counts = np.bincount(np.concatenate([docs[i][:-1] for i in range(100)]), minlength=20)
    assert counts[1] == counts[2] == 0
    others = np.delete(counts, [1, 2])
    assert others.min() > 0.7 * others.mean()


def test_mock_samples_of_a_tokenizer_with_a_pad_id_are_all_trained_on(tokenizer):
    from bridge_data import PretrainDataConfig

    assert tokenizer.pad not in (tokenizer.eod, None)
    train, _, _ = PretrainDataConfig(seq_length=32, seed=5).build(tokenizer, train_samples=200, valid_samples=None,
                                                                   test_samples=None)
    assert all(bool(train[i]["loss_mask"].all()) for i in range(200))
