"""Tool-call parsers by `--tool-call-parser` name (vLLM's names)."""

from __future__ import annotations

from splitserve.frontend.tool_parsers.base import Parsed, ToolCall, ToolParser
from splitserve.frontend.tool_parsers.hermes import HermesToolParser
from splitserve.frontend.tool_parsers.llama3_json import Llama3JsonToolParser

PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser,
                                        "llama3_json": Llama3JsonToolParser}
TOOL_CALL_PARSERS = tuple(PARSERS)

__all__ = ["PARSERS", "TOOL_CALL_PARSERS", "Parsed", "ToolCall", "ToolParser"]
