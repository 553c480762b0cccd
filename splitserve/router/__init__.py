"""Picks workers for a request: round-robin, random, or kv (prefix overlap + load)."""

from splitserve.kvtypes.events import (
    AllCleared, BlockRemoved, BlockStored, KVEvent, KVEventBatch, decode_batch, encode_batch)
from splitserve.router.factory import make_policy
from splitserve.router.index import ApplyResult, KVIndex
from splitserve.router.inflight import InflightTracker
from splitserve.router.kv import KvPolicy
from splitserve.router.load import WorkerLoad
from splitserve.router.policy import (
    POLICIES, Decision, RouteRequest, RouterConfig, RoutingPolicy)
from splitserve.router.simple import RandomPolicy, RoundRobinPolicy

__all__ = [
    "AllCleared", "ApplyResult", "BlockRemoved", "BlockStored", "Decision", "InflightTracker",
    "KVEvent", "KVEventBatch", "KVIndex", "KvPolicy", "POLICIES",
    "RandomPolicy", "RoundRobinPolicy", "RouteRequest", "RouterConfig", "RoutingPolicy",
    "WorkerLoad", "decode_batch", "encode_batch", "make_policy",
]
