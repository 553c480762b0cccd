"""The host mirror KV on a GPU moves through (staging.py): blocks copied device -> host on
the prefill side and host -> device on the decode side land in the same physical block of
every layer, in whichever dim the layout keeps blocks, and nothing else moves. Here the
"device" tensors are on CPU (the same code; CUDA adds only the synchronize); on a machine
with CUDA the last test runs it on the GPU."""

from __future__ import annotations

import pytest
import torch

from splitserve.transfer.kvmem import KVBlocks
from splitserve.vllm_connector.staging import HostStaging

NUM_BLOCKS = 6


def _layers(device: str = "cpu") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    cpu_layout = torch.randn(NUM_BLOCKS, 2, 32, 16, device=device)       # blocks first
    flash_layout = torch.randn(2, NUM_BLOCKS, 32, 2, 8, device=device)   # K/V planes first
    return {"l0": cpu_layout, "l1": flash_layout, "l2": cpu_layout}      # l2 shares l0's


def _block(t: torch.Tensor, b: int) -> torch.Tensor:
    return t[b] if t.shape[0] == NUM_BLOCKS else t[:, b]


def _check_round_trip(layers: dict[str, torch.Tensor]) -> None:
    staging = HostStaging(layers, NUM_BLOCKS)
    assert staging.mirror["l2"] is staging.mirror["l0"] and len(staging.device_layers) == 2
    for m in staging.mirror.values():
        m.zero_()
    staging.to_host([4, 1])
    for name, dev in staging.device_layers.items():
        host = staging.mirror[name]
        for b in range(NUM_BLOCKS):
            want = _block(dev, b).cpu() if b in (1, 4) else torch.zeros_like(_block(host, b))
            assert torch.equal(_block(host, b), want), (name, b)
    # D: what arrived in the mirror goes to the device blocks, and only those.
    before = {n: t.clone() for n, t in staging.device_layers.items()}
    for m in staging.mirror.values():
        m.fill_(7.0)
    staging.to_device([2, 3])
    for name, dev in staging.device_layers.items():
        for b in range(NUM_BLOCKS):
            want = torch.full_like(_block(dev, b), 7.0) if b in (2, 3) else _block(before[name], b)
            assert torch.equal(_block(dev, b), want), (name, b)
    # The transfer library reads and writes the mirror, as vLLM's CPU layers.
    blocks = KVBlocks.from_layers(staging.mirror, NUM_BLOCKS, 32)
    assert blocks.num_blocks == NUM_BLOCKS and len(blocks.planes) == 1 + 2


def test_blocks_move_between_the_layers_and_the_host_mirror():
    _check_round_trip(_layers())


def test_a_layer_without_a_block_dim_is_refused_naming_it():
    with pytest.raises(ValueError, match="KV layer bad"):
        HostStaging({"bad": torch.zeros(3, 4)}, NUM_BLOCKS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blocks_move_between_gpu_layers_and_pinned_host_memory():
    layers = _layers("cuda")
    assert HostStaging(layers, NUM_BLOCKS).mirror["l0"].is_pinned()
    _check_round_trip(layers)


def test_host_staging_is_a_connector_setting_and_must_be_a_boolean():
    from splitserve.config import ConfigError
    from splitserve.vllm_connector.config import ConnectorConfig

    assert ConnectorConfig.from_extra({"host_staging": True}).host_staging
    assert not ConnectorConfig.from_extra({}).host_staging
    with pytest.raises(ConfigError, match="host_staging must be true or false"):
        ConnectorConfig.from_extra({"host_staging": "yes"})
    with pytest.raises(ConfigError, match="unknown kv_connector_extra_config keys.*stagging"):
        ConnectorConfig.from_extra({"stagging": True})
