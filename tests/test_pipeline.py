import numpy as np
import pytest

from jaxtrain.data.pipeline import eval_batches, train_iterator


class Rows:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": np.int32(i)}


def test_hosts_read_their_rows_of_the_same_global_batches():
    one = train_iterator(Rows(40), batch_size=8, seed=3)
    a = train_iterator(Rows(40), batch_size=4, seed=3, process_index=0, process_count=2)
    b = train_iterator(Rows(40), batch_size=4, seed=3, process_index=1, process_count=2)
    for _ in range(12):  # over two epoch boundaries
        np.testing.assert_array_equal(np.concatenate([next(a)["i"], next(b)["i"]]),
                                      next(one)["i"])
    one = train_iterator(Rows(40), batch_size=8, seed=3)
    epoch1 = np.concatenate([next(one)["i"] for _ in range(5)])
    epoch2 = np.concatenate([next(one)["i"] for _ in range(5)])
    assert sorted(epoch1) == list(range(40)) and not np.array_equal(epoch1, epoch2)


def test_iterator_state_resumes_exactly():
    it = train_iterator(Rows(50), batch_size=8, seed=0)
    for _ in range(9):  # past an epoch boundary
        next(it)
    state = it.get_state()
    expected = [next(it)["i"] for _ in range(4)]
    fresh = train_iterator(Rows(50), batch_size=8, seed=0)
    fresh.set_state(state)
    np.testing.assert_array_equal([next(fresh)["i"] for _ in range(4)], expected)


def test_eval_batches_pad_and_mark_valid_rows():
    batches = list(eval_batches(Rows(10), batch_size=4))
    assert len(batches) == 3
    valid = np.concatenate([b["valid"] for b in batches])
    rows = np.concatenate([b["i"] for b in batches])
    np.testing.assert_array_equal(rows[valid], np.arange(10))
    assert valid.sum() == 10 and len(valid) == 12
    hosts = [np.concatenate([b["i"][b["valid"]] for b in eval_batches(Rows(10), batch_size=2,
             process_index=h, process_count=2)]) for h in range(2)]
    assert sorted(np.concatenate(hosts)) == list(range(10))


def test_batch_larger_than_data_is_an_error():
    with pytest.raises(ValueError, match="larger than the data"):
        train_iterator(Rows(10), batch_size=8, seed=0, process_count=2)
