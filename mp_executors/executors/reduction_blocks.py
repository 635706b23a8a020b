"""The fixed reduction blocks, and splitting clients into shards made of whole blocks.

Clients are reduced in global blocks of `BLOCK_SIZE` consecutive clients
(folded left to right inside a block, then the block partials in client
order; `client_shard` does the folding). Every shard of clients, in a worker
process or an in-process group, starts on a block boundary (`split_clients`),
so each block lives entirely in one shard and a reduction's result does not
depend on how many shards there are.

No TensorFlow here: the parent plans shards before any worker imports it.
"""

from __future__ import annotations

from mp_executors.checks import check_int

__all__ = ["BLOCK_SIZE", "split_clients"]

#: Consecutive clients reduced together before partials are merged. Results do
#: not depend on the number of shards or workers because every shard boundary
#: is a multiple of this (see `split_clients`).
BLOCK_SIZE = 8


def split_clients(num_clients: int, num_workers: int, block_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) shards of clients, one per worker, made of whole blocks.

    Every shard boundary is a multiple of `block_size` (the last block may be
    short), so each reduction block lives entirely in one worker and reductions
    do not depend on the number of workers. Shards are balanced in number of
    blocks (earlier shards get the extra one) and never empty: with fewer blocks
    than workers, fewer shards are returned (min(num_workers, num_blocks)).
    """
    check_int("num_workers", num_workers, fix="pass an integer >= 1")
    check_int("block_size", block_size, fix="pass an integer >= 1")
    check_int("num_clients", num_clients, minimum=0)
    num_blocks = -(-num_clients // block_size)
    if num_blocks == 0:
        return []
    shards = min(num_workers, num_blocks)
    base, extra = divmod(num_blocks, shards)
    result = []
    block = 0
    for i in range(shards):
        nb = base + (1 if i < extra else 0)
        start = block * block_size
        block += nb
        result.append((start, min(num_clients, block * block_size)))
    return result
