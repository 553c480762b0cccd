"""`--router NAME` → a routing policy."""

from __future__ import annotations

from splitserve.router.index import KVIndex
from splitserve.router.kv import KvPolicy
from splitserve.router.policy import RouterConfig, RoutingPolicy
from splitserve.router.simple import RandomPolicy, RoundRobinPolicy


def make_policy(config: RouterConfig, index: KVIndex | None = None) -> RoutingPolicy:
    """The kv policy reads (and predicts into) `index`, which the frontend feeds with the
    workers' KV events; the other policies ignore it."""
    if config.policy == "round-robin":
        return RoundRobinPolicy()
    if config.policy == "random":
        return RandomPolicy(config.seed)
    if index is None:
        raise ValueError("the kv router policy needs a KVIndex")
    return KvPolicy(index, config.overlap_weight)
