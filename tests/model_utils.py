"""Test helpers: a tidal ModelRunner over an in-memory HF model, all-position logits, and
`ManualScheduler`, which drives a runner with SchedulerOutputs and no tidal Scheduler."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tidal.config import EngineConfig
from tidal.engine.model_runner import ModelRunner
from tidal.engine.step_io import ModelRunnerOutput, NewRequestData, SchedulerOutput
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


class ManualScheduler:
    """SchedulerOutputs for a fixed set of requests, from a plain BlockManager: each step every request
    that is not done advances by up to `chunk` tokens (all it has left by default). `update` takes the
    runner's output back (computed tokens, sampled tokens), as the engine would."""

    def __init__(self, num_blocks: int, block_size: int, prompts: dict[str, list[int]], params: SamplingParams,
                 chunk: int | None = None, seeds: dict[str, int] | None = None):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.prompts, self.params, self.chunk = prompts, params, chunk
        self.seeds = seeds or {rid: 0 for rid in prompts}
        self.outputs = {rid: [] for rid in prompts}
        self.computed = {rid: 0 for rid in prompts}
        self.sent: dict[str, int] = {}   # block ids the runner has, per request it holds
        self.finished: set[str] = set()

    def tokens(self, rid: str) -> list[int]:
        return self.prompts[rid] + self.outputs[rid]

    def done(self, rid: str) -> bool:
        return rid in self.finished or len(self.outputs[rid]) >= self.params.max_tokens

    def schedule(self, finished: set[str] = frozenset()) -> SchedulerOutput:
        so = SchedulerOutput(finished_req_ids=set(finished))
        for rid in finished:   # the caller drops these (e.g. as if preempted): the runner forgets them
            self.bm.free(rid)
            self.sent.pop(rid, None)
            self.computed[rid] = 0
        for rid in self.prompts:
            left = len(self.tokens(rid)) - self.computed[rid]
            if self.done(rid) or left == 0:
                continue
            n = min(left, self.chunk or left)
            assert self.bm.allocate_slots(rid, self.tokens(rid), self.computed[rid], n)
            so.num_scheduled_tokens[rid] = n
            if rid in self.sent:
                new = self.bm.new_block_ids(rid, self.sent[rid])
                so.scheduled_cached_reqs.append(rid, new, self.computed[rid])
            else:
                new = self.bm.get_block_table(rid)
                so.scheduled_new_reqs.append(NewRequestData(rid, list(self.prompts[rid]), list(self.outputs[rid]),
                                                            self.params, self.seeds[rid], new, self.computed[rid]))
                self.sent[rid] = 0
            self.sent[rid] += len(new)
        so.total_num_scheduled_tokens = sum(so.num_scheduled_tokens.values())
        return so

    def update(self, so: SchedulerOutput, out: ModelRunnerOutput | None = None) -> None:
        for rid, n in so.num_scheduled_tokens.items():
            self.computed[rid] += n
        if out is not None:
            for rid, tokens in zip(out.req_ids, out.sampled_token_ids):
                self.outputs[rid] += tokens

    def run(self, runner: ModelRunner) -> dict[str, list[int]]:
        """Step `runner` until every request has max_tokens outputs; returns them."""
        while not all(self.done(rid) for rid in self.prompts):
            so = self.schedule()
            self.update(so, runner.execute_model(so))
        return self.outputs


def all_logits(runner: ModelRunner, prompts: list[list[int]], chunk: int | None = None) -> list[torch.Tensor]:
    """Logits at every position of each prompt, all prompts in one flat batch (or in chunks of
    `chunk` tokens per step, exercising chunked prefill over the paged cache)."""
    sched = ManualScheduler(runner.num_blocks, runner.block_size, {str(i): list(p) for i, p in enumerate(prompts)},
                            SamplingParams(max_tokens=1), chunk=chunk)
    pieces: list[list[torch.Tensor]] = [[] for _ in prompts]
    while any(sched.computed[str(i)] < len(p) for i, p in enumerate(prompts)):
        so = sched.schedule()
        rows = runner.input_batch.update(so)
        hidden, layout = runner.forward(rows)
        with torch.inference_mode():
            logits = runner.model.compute_logits(hidden).float()
        start = 0
        for rid, n in so.num_scheduled_tokens.items():
            pieces[int(rid)].append(logits[start:start + n])
            start += n
        sched.update(so)
    runner.input_batch.update(SchedulerOutput(finished_req_ids=set(sched.prompts)))
    return [torch.cat(p) for p in pieces]
