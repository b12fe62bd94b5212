"""Test helpers: a tidal ModelRunner over an in-memory HF model, and all-position logits."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tidal.config import EngineConfig
from tidal.engine.model_runner import ModelRunner
from tidal.engine.request import Request
from tidal.engine.scheduler import ScheduledBatch
from tidal.kv.block_manager import BlockManager
from tidal.sampling import SamplingParams


@dataclass
class InMemoryCheckpoint:
    """Duck-types weights.loader.Checkpoint over a transformers model already in memory."""
    hf_model: torch.nn.Module
    path: str = "<in-memory>"
    format: str = "hf"

    @property
    def hf_config(self):
        return self.hf_model.config

    def iter_tensors(self, dtype):
        for name, t in self.hf_model.state_dict().items():
            yield name, t.to(dtype)

    def load_tokenizer(self):
        raise NotImplementedError


def make_runner(hf_model, dtype="float32", num_blocks=256, block_size=4, checkpoint=None,
                pack: bool = False, device: str = "cpu") -> ModelRunner:
    """pack=False keeps plain linear weights (backend packing drops them), so tests can still
    rewrite the model afterwards, e.g. quantize it."""
    cfg = EngineConfig(model="<in-memory>", device=device, dtype=dtype, num_kv_blocks=num_blocks,
                       block_size=block_size)
    old = os.environ.get("TIDAL_PACK_LINEAR")
    os.environ["TIDAL_PACK_LINEAR"] = "1" if pack else "0"
    try:
        return ModelRunner(cfg, checkpoint=checkpoint or InMemoryCheckpoint(hf_model))
    finally:
        if old is None:
            os.environ.pop("TIDAL_PACK_LINEAR")
        else:
            os.environ["TIDAL_PACK_LINEAR"] = old


def all_logits(runner: ModelRunner, prompts: list[list[int]], chunk: int | None = None) -> list[torch.Tensor]:
    """Logits at every position of each prompt, all prompts in one flat batch (or in chunks of
    `chunk` tokens per step, exercising chunked prefill over the paged cache)."""
    bm = BlockManager(runner.num_blocks, runner.block_size, enable_prefix_caching=False)
    reqs = [Request(str(i), list(p), SamplingParams(max_tokens=1), seed=0) for i, p in enumerate(prompts)]
    pieces: list[list[torch.Tensor]] = [[] for _ in prompts]
    while any(r.num_computed_tokens < r.num_tokens for r in reqs):
        batch = ScheduledBatch()
        for r in reqs:
            left = r.num_tokens - r.num_computed_tokens
            if left:
                n = min(left, chunk or left)
                assert bm.allocate_slots(r.request_id, r.all_token_ids, r.num_computed_tokens, n)
                batch.requests.append(r)
                batch.num_new_tokens.append(n)
        tables = [bm.get_block_table(r.request_id) for r in batch.requests]
        hidden, layout = runner.forward(batch, tables)
        with torch.inference_mode():
            logits = runner.model.compute_logits(hidden).float()
        start = 0
        for r, n in zip(batch.requests, batch.num_new_tokens):
            pieces[int(r.request_id)].append(logits[start:start + n])
            start += n
            r.num_computed_tokens += n
    return [torch.cat(p) for p in pieces]
