"""Which replica holds which prompt prefix: the EPP's prefix index, and a prompt's block hashes.

Owns:
- `prompt_token_ids(tokenizer, path, body)`: the prompt ids a replica will see, as tidal's server
  makes them (chat: the messages normalized as serving_chat does, then
  `apply_chat_template(..., add_generation_prompt=True, tokenize=True)`; completions: `encode`
  with special tokens, token-id prompts as they are; a batch: its first prompt).
- `block_hashes(ids, block_size)`: the engine's chained hashes (`tidal.kv.block_manager.hash_block`)
  over the full blocks, so they compare equal to the hashes in a replica's KV events.
- `PrefixIndex`: per replica, the block hashes it holds, and `match` (longest cached prefix, in
  blocks, per replica). A replica is in one of two modes:
  *precise* (it publishes KV events): BlockStored adds, BlockRemoved removes, AllBlocksCleared
  clears; a routed request's blocks are added *speculatively* with a TTL (`speculative_ttl_s`,
  30 s by default, restarted by each request routed with them) until the replica's own events
  confirm them (BlockStored) or drop them (BlockRemoved), so a burst of same-prefix requests sees
  the prefix where the first one went instead of stale data. The TTL must outlast a cold prefill
  behind a queue (a 2,048-token one takes seconds): when it ran out first (2 s), the group's next
  requests found nothing held and spread over the fleet;
  *approximate* (no events): the blocks of requests routed there, remembered in an LRU bounded
  per replica (`lru_capacity_blocks`), refreshed when matched again.
Must not: subscribe to sockets (kv_subscriber.py does and calls `apply_event`), poll replicas,
or score (plugins.py turns a match into a score).
"""
from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from tidal.kv.block_manager import hash_block

logger = logging.getLogger("tidal.fleet.epp")

CHAT_PATHS = ("/v1/chat/completions",)
COMPLETION_PATHS = ("/v1/completions",)


# ---- prompt -> token ids -> block hashes -------------------------------------------------------
def _chat_messages(messages: list) -> list[dict]:
    """The messages as tidal's server hands them to the chat template (serving_chat._messages)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        msg = {"role": "system" if m.get("role") == "developer" else m.get("role"), "content": content or ""}
        if m.get("name"):
            msg["name"] = m["name"]
        if m.get("tool_call_id") is not None:
            msg["tool_call_id"] = m["tool_call_id"]
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = c.get("function") or {}
                args = fn.get("arguments")
                calls.append({"id": c.get("id") or "", "type": "function",
                              "function": {"name": fn.get("name"),
                                           "arguments": json.loads(args) if isinstance(args, str) else args}})
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _with_tools(tokenizer, body: dict, messages: list[dict]) -> tuple[list[dict], list[dict] | None]:
    """Tools go into the prompt as the server puts them (serving_tools.ChatTools.template_inputs)."""
    from tidal.server.protocol import ChatCompletionRequest
    from tidal.server.serving_tools import ChatTools
    from tidal.structured.tool_parsers import get_parser
    req = ChatCompletionRequest.model_validate(body)
    tools = ChatTools(req.tools, req.tool_choice, get_parser("auto", tokenizer.chat_template), req.parallel_tool_calls)
    return tools.template_inputs(messages, tokenizer.chat_template)


def prompt_token_ids(tokenizer, path: str, body: dict | None) -> list[int] | None:
    """The prompt's token ids as the replica will compute them, or None (no body, unknown route,
    a malformed body: the replica will answer that one itself)."""
    if not isinstance(body, dict) or tokenizer is None:
        return None
    path = path.split("?", 1)[0]
    try:
        if path in CHAT_PATHS:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                return None
            msgs, tools = _chat_messages(messages), None
            if body.get("tools"):
                msgs, tools = _with_tools(tokenizer, body, msgs)
            out = tokenizer.apply_chat_template(msgs, tools=tools,
                                                add_generation_prompt=body.get("add_generation_prompt", True),
                                                tokenize=True)
            return list(out["input_ids"] if hasattr(out, "keys") else out)
        if path in COMPLETION_PATHS:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                prompt = prompt[0]          # a batch goes to one replica; its first prompt decides
            if isinstance(prompt, str):
                return list(tokenizer.encode(prompt, add_special_tokens=True)) if prompt else None
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return list(prompt)
    except Exception as exc:   # a body the template or tokenizer refuses: route without a prefix
        logger.debug("could not tokenize a %s body: %r", path, exc)
    return None


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks, exactly as the replicas' block managers compute them."""
    out, parent = [], None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size])
        out.append(parent)
    return out


# ---- the index ---------------------------------------------------------------------------------
@dataclass
class _Replica:
    precise: bool
    confirmed: set[int] = field(default_factory=set)               # precise: from the replica's events
    speculative: dict[int, float] = field(default_factory=dict)    # precise: hash -> expiry (monotonic)
    history: OrderedDict = field(default_factory=OrderedDict)      # approximate: LRU of routed hashes


class PrefixIndex:
    def __init__(self, block_size: int = 16, speculative_ttl_s: float = 30.0, lru_capacity_blocks: int = 65536,
                 clock: Callable[[], float] = time.monotonic):
        self.block_size = block_size
        self.speculative_ttl_s = speculative_ttl_s
        self.lru_capacity_blocks = lru_capacity_blocks
        self.clock = clock
        self._replicas: dict[str, _Replica] = {}

    def set_mode(self, address: str, precise: bool) -> None:
        r = self._replicas.get(address)
        if r is None or r.precise != precise:
            self._replicas[address] = _Replica(precise)

    def is_precise(self, address: str) -> bool:
        r = self._replicas.get(address)
        return r is not None and r.precise

    def _replica(self, address: str) -> _Replica:
        r = self._replicas.get(address)
        if r is None:
            r = self._replicas[address] = _Replica(precise=False)
        return r

    def clear(self, address: str) -> None:
        """Forget everything about one replica (it restarted, or its event stream broke)."""
        r = self._replicas.get(address)
        if r is not None:
            self._replicas[address] = _Replica(r.precise)

    def remove(self, address: str) -> None:
        self._replicas.pop(address, None)

    # -- events (precise mode) --
    def apply_event(self, address: str, event) -> str:
        """One KV event from `address` (tidal.fleet.kv_events' Structs or tidal.kv.events' dataclasses:
        matched by class name). Returns the event's kind."""
        r = self._replica(address)
        kind = type(event).__name__.removeprefix("Wire")   # kv_events.py names its Structs Wire*
        if kind == "BlockStored":
            for h in event.block_hashes:
                r.confirmed.add(h)
                r.speculative.pop(h, None)
        elif kind == "BlockRemoved":
            for h in event.block_hashes:
                r.confirmed.discard(h)
                r.speculative.pop(h, None)
        elif kind == "AllBlocksCleared":
            r.confirmed.clear()
            r.speculative.clear()
        return kind

    # -- routing --
    def record_routed(self, address: str, hashes: Iterable[int]) -> None:
        """The picker sent a request with these blocks to `address`."""
        r = self._replica(address)
        if r.precise:
            expiry = self.clock() + self.speculative_ttl_s
            for h in hashes:
                if h not in r.confirmed:
                    r.speculative[h] = expiry
            if len(r.speculative) > self.lru_capacity_blocks:
                self._expire(r, force=True)
        else:
            for h in hashes:
                r.history[h] = None
                r.history.move_to_end(h)
            while len(r.history) > self.lru_capacity_blocks:
                r.history.popitem(last=False)

    def _expire(self, r: _Replica, force: bool = False) -> None:
        now = self.clock()
        for h in [h for h, t in r.speculative.items() if t <= now]:
            del r.speculative[h]
        if force and len(r.speculative) > self.lru_capacity_blocks:   # oldest first (insertion order)
            for h in list(r.speculative)[:len(r.speculative) - self.lru_capacity_blocks]:
                del r.speculative[h]

    def match(self, hashes: Sequence[int], addresses: Iterable[str]) -> dict[str, int]:
        """Longest held prefix, in blocks, of `hashes` on each of `addresses`."""
        out = {}
        now = self.clock()
        for address in addresses:
            r = self._replicas.get(address)
            n = 0
            if r is not None:
                if r.precise:
                    for h in hashes:
                        if h in r.confirmed:
                            n += 1
                            continue
                        expiry = r.speculative.get(h)
                        if expiry is None or expiry <= now:
                            break
                        n += 1
                else:
                    for h in hashes:
                        if h not in r.history:
                            break
                        n += 1
                    for h in hashes[:n]:   # a prefix in use stays warm in the LRU
                        r.history.move_to_end(h)
            out[address] = n
        return out

    def prune(self) -> None:
        """Drop expired speculative entries (the picker calls this after every metrics poll)."""
        for r in self._replicas.values():
            if r.speculative:
                self._expire(r)

    def held_blocks(self, address: str) -> int:
        r = self._replicas.get(address)
        if r is None:
            return 0
        return len(r.confirmed) + len(r.speculative) + len(r.history)
