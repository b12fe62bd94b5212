"""The offline Python API: `LLM(model, **engine_args).generate(prompts, params)` and `.chat(...)`.

Owns: turning a list of prompts into engine requests, driving `LLMEngine.step()` with a
progress bar until all finish, and returning outputs in input order.
Must not: schedule or run the model itself.
"""
from __future__ import annotations

from typing import Sequence

from tqdm import tqdm

from tidal.config import EngineConfig
from tidal.engine.llm_engine import LLMEngine
from tidal.errors import TidalError
from tidal.outputs import RequestOutput
from tidal.sampling import SamplingParams

PromptType = str | list[int] | dict


class LLM:
    def __init__(self, model: str = "smollm2", **engine_args):
        self.config = EngineConfig.from_kwargs(model=model, **engine_args)
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Prompts are strings, token-id lists, or {"prompt": ...} / {"prompt_token_ids": ...} dicts."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.get_default_sampling_params()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise TidalError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts; give one or one each")
        ids = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            text, token_ids = _split_prompt(prompt)
            rid = f"gen-{id(self)}-{self.engine._counter}-{i}"
            self.engine.add_request(rid, text, p, prompt_token_ids=token_ids,
                                    priority=priority[i] if priority else 0)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation-config defaults (what `generate` uses without params)."""
        return SamplingParams(**self.engine.default_sampling)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise TidalError("this model's tokenizer has no chat template; use generate() with a plain prompt")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def stats(self) -> dict:
        """Engine counters plus KV cache usage and prefix-cache hit rate."""
        return {**self.engine.stats, "kv": self.engine.kv_stats(),
                "preemptions": self.engine.scheduler.num_preemptions}

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="generating", unit=" req", disable=not use_tqdm, dynamic_ncols=True)
        out_tokens = 0
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        out_tokens += sum(len(o.token_ids) for o in out.outputs)
                        bar.update(1)
                        rate = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(f"{out_tokens / rate:.1f} out tok/s")
        except BaseException:
            for rid in ids:
                if rid not in done:
                    self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in ids]


def _split_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"], None
        raise TidalError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return None, list(prompt)
    raise TidalError(f"a prompt must be a string, a list of token ids or a dict, not {type(prompt).__name__}")
