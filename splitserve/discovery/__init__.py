"""Where workers are found: a file store (embedded), etcd (many machines), a static list."""

from splitserve.discovery.base import Discovery, DiscoveryError
from splitserve.discovery.etcd_store import EtcdDiscovery, EtcdDiscoveryConfig
from splitserve.discovery.factory import DISCOVERY_FORMS, parse_discovery
from splitserve.discovery.file_store import FileDiscovery, FileDiscoveryConfig
from splitserve.discovery.record import (
    Role, State, WatchEvent, WorkerRecord, decode_record, encode_record)
from splitserve.discovery.static import StaticDiscovery, StaticDiscoveryConfig

__all__ = [
    "DISCOVERY_FORMS", "Discovery", "DiscoveryError", "EtcdDiscovery", "EtcdDiscoveryConfig",
    "FileDiscovery", "FileDiscoveryConfig", "Role", "State", "StaticDiscovery",
    "StaticDiscoveryConfig", "WatchEvent", "WorkerRecord", "decode_record", "encode_record",
    "parse_discovery",
]
