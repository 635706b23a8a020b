"""Executors: one per module, interfaces in `executor_base`.

    executor_base                 Executor, ExecutorValue (the contract)
    eager_tf_executor             EagerTFExecutor: the TensorFlow leaf
    reference_resolving_executor  lambdas, blocks, references, structs
    federating_executor           placements + intrinsics over client shards
    client_shard                  the per-shard half of every intrinsic
    in_process_shard              InProcessShard: a ClientShard in this process (local stack)
    reduction_blocks              BLOCK_SIZE and split_clients (shards of whole blocks)
"""

from mp_executors.executors.client_shard import ClientShard
from mp_executors.executors.eager_tf_executor import EagerTFExecutor
from mp_executors.executors.executor_base import Executor, ExecutorValue
from mp_executors.executors.federating_executor import FederatingExecutor
from mp_executors.executors.in_process_shard import InProcessShard
from mp_executors.executors.reduction_blocks import BLOCK_SIZE, split_clients
from mp_executors.executors.reference_resolving_executor import ReferenceResolvingExecutor

__all__ = [
    "BLOCK_SIZE",
    "ClientShard",
    "EagerTFExecutor",
    "Executor",
    "ExecutorValue",
    "FederatingExecutor",
    "InProcessShard",
    "ReferenceResolvingExecutor",
    "split_clients",
]
