"""Tests for mp_executors.executors.reduction_blocks (split_clients) and mp_executors.checks."""

from __future__ import annotations

import numpy as np
import pytest

from mp_executors.checks import check_int, is_int
from mp_executors.executors.reduction_blocks import BLOCK_SIZE, split_clients


def _check_split(n: int, w: int, b: int) -> None:
    shards = split_clients(n, w, b)
    num_blocks = -(-n // b)
    assert len(shards) == min(w, num_blocks), (n, w, b, shards)
    if n == 0:
        assert shards == []
        return
    # contiguous, covering [0, n), never empty
    assert shards[0][0] == 0 and shards[-1][1] == n
    for (_, e0), (s1, _) in zip(shards, shards[1:]):
        assert e0 == s1
    assert all(start < stop for start, stop in shards)
    # every boundary is on a block boundary (the final stop is n)
    for start, stop in shards:
        assert start % b == 0
        assert stop == n or stop % b == 0
    # balanced in blocks, earlier shards get the extra block
    blocks = [-(-(stop - start) // b) for start, stop in shards]
    assert sum(blocks) == num_blocks
    assert max(blocks) - min(blocks) <= 1
    assert blocks == sorted(blocks, reverse=True)


def test_split_clients_properties():
    for n in range(0, 70):
        for w in range(1, 12):
            for b in range(1, 12):
                _check_split(n, w, b)
    for n, w, b in [
        (10_000, 7, 64),
        (10_001, 64, 1),
        (1000, 3, 1000),
        (999, 1000, 1),
        (12345, 17, 10),
    ]:
        _check_split(n, w, b)


def test_split_clients_examples():
    assert split_clients(10, 2, 1) == [(0, 5), (5, 10)]
    assert split_clients(10, 3, 1) == [(0, 4), (4, 7), (7, 10)]
    assert split_clients(10, 3, 4) == [(0, 4), (4, 8), (8, 10)]  # last block short
    assert split_clients(10, 2, 4) == [(0, 8), (8, 10)]  # 3 blocks: 2 + 1
    assert split_clients(10, 5, 4) == [(0, 4), (4, 8), (8, 10)]  # fewer blocks than workers
    assert split_clients(3, 8, 1) == [(0, 1), (1, 2), (2, 3)]
    assert split_clients(5, 1, 2) == [(0, 5)]
    assert split_clients(0, 4, 2) == []


@pytest.mark.parametrize(
    "args",
    [
        (10, 0, 1),
        (10, -1, 1),
        (10, 2, 0),
        (10, 2, -3),
        (-1, 2, 1),
        (10, 2.0, 1),
        (10.0, 2, 1),
        (10, True, 1),
    ],
)
def test_split_clients_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        split_clients(*args)


def test_block_size_is_a_whole_number_of_clients():
    assert is_int(BLOCK_SIZE) and BLOCK_SIZE >= 8


@pytest.mark.parametrize("value, minimum", [(0, 0), (1, 1), (np.int64(3), 1), (2, 2)])
def test_check_int_accepts(value, minimum):
    got = check_int("n", value, minimum=minimum)
    assert got == value and type(got) is int and is_int(value, minimum)


@pytest.mark.parametrize(
    "value, minimum, what",
    [(0, 1, "a positive integer"), (-1, 0, "an integer >= 0"), (1, 2, "an integer >= 2"),
     (True, 1, "a positive integer"), (2.0, 1, "a positive integer"), ("3", 1, "a positive integer"),
     (None, 1, "a positive integer")],
)
def test_check_int_refuses_naming_the_argument_and_the_fix(value, minimum, what):
    with pytest.raises(ValueError) as exc:
        check_int("num_things", value, minimum=minimum, fix="pass e.g. 4")
    assert str(exc.value) == f"num_things={value!r} is invalid: it must be {what}; pass e.g. 4"
    assert not is_int(value, minimum)
