"""Structured output: grammars (JSON schema, regex, choice, EBNF) that constrain what a request generates.

Owns: params.py (the plain-data spec `StructuredOutputsParams` and `from_openai_request`), compiler.py
(validation and an LRU of grammars compiled on a thread pool), matcher.py (one sequence's grammar state),
bitmask.py (a batch's allowed-token bitmask and applying it to logits), tools.py (OpenAI function tools as
grammars) and tool_parsers.py (the models' own tool-call text formats).
Must not: import the engine, the server or the model; importing this package does not import xgrammar.
"""
from tidal.structured.params import StructuredOutputsParams, from_openai_request

__all__ = ["StructuredOutputsParams", "from_openai_request"]
