"""Llama-family models for the engine: config (what a checkpoint is), llama (the forward,
attention delegated to the caller), loader (safetensors -> model), registry (what
--model may name, including the embedded default converted from GGUF)."""
