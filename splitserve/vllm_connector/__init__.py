"""splitserve's KV hand-off as a vLLM KV connector (vLLM v1 `KVConnectorBase_V1`).

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "SplitserveConnector",
        "kv_connector_module_path": "splitserve.vllm_connector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"kv_port": 7600}}'

vLLM imports this module and takes `SplitserveConnector` from it. The name is resolved
lazily so that the proxy (`splitserve vllm-proxy`, proxy.py) runs without importing vLLM.
"""

import importlib

__all__ = ["SplitserveConnector"]


def __getattr__(name: str):
    if name != "SplitserveConnector":
        raise AttributeError(f"module 'splitserve.vllm_connector' has no attribute {name!r}")
    return importlib.import_module("splitserve.vllm_connector.connector").SplitserveConnector
