"""Datasets and per-rank batching."""

import numpy as np
import pytest
import torch

from workloads import data as D
from workloads.errors import ConfigError


@pytest.fixture(scope="module")
def digits64():
    return D.load_image_data((1, 64, 64), 0.15, 0.15)


def test_digits_are_resized_and_split_deterministically(digits64):
    again = D.load_image_data((1, 64, 64), 0.15, 0.15)
    assert digits64.train.x.shape[1:] == (1, 64, 64)
    assert len(digits64.train) + len(digits64.val) + len(digits64.test) == 1797
    assert len(digits64.test) == int(1797 * 0.15)
    assert torch.equal(digits64.test.y, again.test.y) and torch.equal(digits64.train.x, again.train.x)
    assert set(digits64.train.y.tolist()) == set(range(10))


def test_splits_do_not_share_images(digits64):
    train = {row.numpy().tobytes() for row in digits64.train.x}
    test = {row.numpy().tobytes() for row in digits64.test.x}
    assert not train & test


def test_three_channel_24px_input_for_seed_cnn():
    data = D.load_image_data((3, 24, 24), 0.1, 0.1)
    assert data.train.x.shape[1:] == (3, 24, 24)
    assert torch.equal(data.train.x[:, 0], data.train.x[:, 2])


def test_digits_from_an_npz_url(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, images=rng.random((100, 8, 8)), labels=rng.integers(0, 10, 100))
    data = D.load_image_data((1, 16, 16), 0.2, 0.2, data_url=path.as_uri())
    assert len(data.train) == 60 and data.source == path.as_uri()


def test_npz_without_labels_is_a_clear_error(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, pictures=np.zeros((3, 8, 8)))
    with pytest.raises(ConfigError, match="'images' and 'labels'"):
        D.load_image_data((1, 16, 16), 0.2, 0.2, data_url=path.as_uri())


def test_ranks_read_disjoint_shards_covering_the_epoch():
    split = D.Split(torch.arange(100).float().unsqueeze(1), torch.arange(100))
    seen = []
    for rank in range(3):
        b = D.ShardedBatches(split, 8, rank, 3, seed=5)
        rank_seen = torch.cat([b.next()[1] for _ in range(b.batches_per_epoch)]).tolist()
        seen.append(rank_seen)
    assert all(len(s) == 34 for s in seen)  # ceil(100 / 3), padded like DistributedSampler
    assert set(seen[0]) | set(seen[1]) | set(seen[2]) == set(range(100))
    assert len(set(seen[0]) & set(seen[1])) <= 2  # only the padding repeats


def test_batches_resume_at_the_saved_position():
    split = D.Split(torch.randn(50, 1), torch.arange(50))
    a = D.ShardedBatches(split, 4, 0, 1, seed=3)
    for _ in range(17):  # crosses an epoch boundary (13 batches per epoch)
        a.next()
    b = D.ShardedBatches(split, 4, 0, 1, seed=3)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.next()[1], b.next()[1]) for _ in range(20))


def test_augmentation_shifts_are_deterministic_and_bounded():
    x = torch.zeros(4, 1, 10, 10)
    x[:, :, 5, 5] = 1.0
    a, b = D.shift_images(x, seed=9), D.shift_images(x, seed=9)
    assert torch.equal(a, b)
    for img in a:
        r, c = (img[0] == 1.0).nonzero()[0].tolist()
        assert abs(r - 5) <= D.MAX_SHIFT and abs(c - 5) <= D.MAX_SHIFT


def test_stdlib_corpus_is_real_python_source():
    corpus, source = D.load_corpus("", 200_000)
    assert len(corpus) == 200_000
    assert b"def " in corpus and b"import " in corpus
    assert "stdlib" in source


def test_text_from_a_directory_url(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello world " * 100)
    (tmp_path / "b.txt").write_bytes(b"lorem ipsum " * 100)
    data = D.load_text_data(tmp_path.as_uri(), 10_000, 0.1)
    assert len(data.train) + len(data.val) == 2400


def test_lm_shards_are_disjoint_and_targets_shifted():
    tokens = torch.arange(1000, dtype=torch.int64) % 256
    tokens = tokens.to(torch.uint8)
    b0 = D.LMBatches(tokens, 4, 16, 0, 2, seed=1, device=torch.device("cpu"))
    b1 = D.LMBatches(tokens, 4, 16, 1, 2, seed=1, device=torch.device("cpu"))
    x0, y0 = b0.next()
    assert torch.equal(x0[:, 1:], y0[:, :-1])
    assert b0.tokens.data_ptr() != b1.tokens.data_ptr() and len(b0.tokens) == len(b1.tokens) == 500


def test_lm_batches_resume_from_generator_state():
    tokens = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    a = D.LMBatches(tokens, 2, 8, 0, 1, seed=4, device=torch.device("cpu"))
    a.next()
    state = a.state_dict()
    expected = a.next()[0]
    b = D.LMBatches(tokens, 2, 8, 0, 1, seed=4, device=torch.device("cpu"))
    b.load_state_dict(state)
    assert torch.equal(b.next()[0], expected)
