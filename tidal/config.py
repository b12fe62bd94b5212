"""Every engine config, validated in __post_init__.

Owns: `EngineConfig` (the engine flags shared by the CLI, `LLM(...)` and the server),
size parsing ("2GiB"), resolving "auto" device/dtype, and the engine flags as argparse options
(`ENGINE_FLAGS`, `add_engine_flags`, `engine_kwargs`), which every subcommand shares.
Must not: import the model, engine or server (this module sits below all of them).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from tidal.errors import TidalError

if TYPE_CHECKING:
    import torch

# torch is imported where a device or dtype is resolved, not at import: the flags alone (`tidal gateway`,
# `tidal cluster`, `--help`) then start without torch's ~1 s import
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
           "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}
# --quant: w8a8 stores weights as int8 (per row, like int8) and also rounds activations to int8 per
# token (smoothed, model/smooth.py), so the planner sizes it as int8 (`weight_format`)
WEIGHT_QUANTS = ("none", "int8", "int4", "w8a8")


def weight_format(quant: str) -> str:
    """The storage format of a --quant value: what the planner and memory estimates size."""
    return "int8" if quant == "w8a8" else quant


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(value: str | int | float | None, name: str) -> int | None:
    """'2GiB', '512MB', '1.5G' or a plain byte count -> bytes."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise TidalError(f"--{name.replace('_', '-')} '{value}' is not a size; write it like 2GiB, 512MiB or 4000000000",
                         param=name)
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def resolve_device(device: str) -> torch.device:
    import torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TidalError(f"--device '{device}' is not a device; use cpu, cuda, cuda:N or auto", param="device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TidalError("--device cuda was asked for but torch sees no CUDA device (CPU build of torch, or no GPU); "
                         "use --device cpu, or install a CUDA build of torch", param="device")
    if dev.type not in ("cpu", "cuda"):
        raise TidalError(f"--device '{device}' is not supported; use cpu or cuda", param="device")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch
    if dtype == "auto":
        # bf16 halves the bytes streamed per decoded token and runs matmuls faster on CPUs with
        # AVX512-BF16/AMX and on every recent GPU; fp32 is the safe fallback.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_fast_bf16() else torch.float32
    if dtype not in _DTYPES:
        raise TidalError(f"--dtype '{dtype}' is not supported; use auto, float32, bfloat16 or float16", param="dtype")
    result = getattr(torch, _DTYPES[dtype])
    try:  # a dtype the device cannot run fails here, with a message, not in the middle of a forward pass
        a = torch.ones(4, 4, dtype=result, device=device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as e:
        raise TidalError(f"--dtype {dtype} cannot run on {device} ({str(e).splitlines()[0]}); "
                         "use --dtype float32", param="dtype")
    if device.type == "cuda" and result == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise TidalError(f"--dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}; "
                         "use --dtype float16", param="dtype")
    return result


def _cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


@dataclass
class EngineConfig:
    model: str = "smollm2"
    tokenizer: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    kv_mem: str | int | None = None          # KV cache pool size; default: a share of free memory
    num_kv_blocks: int | None = None         # overrides kv_mem (tests use tiny pools)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    long_prefill_token_threshold: int = 0    # most tokens one prefill gets a step (0: up to the whole budget)
    short_prefill_tokens: int = 0            # prompts needing at most this many tokens go first (0: FCFS)
    enable_prefix_caching: bool = True
    enable_jump_forward: bool = True         # append the tokens a grammar forces without a decode step
    quant: str = "none"
    quant_head: str = "none"                 # the LM head: none (the checkpoint's precision), int8, int4 or w8a8
    kv_quant: str = "none"
    device_mem: str | int | None = None
    host_mem: str | int | None = None
    offload_dir: str | None = None
    policy: str = "auto"
    prompt_len: int = 0                      # the workload --policy auto plans for (0: 512)
    gen_len: int = 0                         # (0: 32)
    load_format: str = "auto"
    enforce_eager: bool = False
    generation_config: str = "auto"          # sampling defaults: the checkpoint's (auto), vllm (none), or a folder
    kv_events_endpoint: str | None = None    # publish KV events (ZeroMQ PUB, vLLM's format) here: tcp://*:5557

    def __post_init__(self):
        if self.block_size < 1 or self.block_size > 1024:
            raise TidalError(f"--block-size {self.block_size} must be between 1 and 1024", param="block_size")
        if self.max_num_seqs < 1:
            raise TidalError("--max-num-seqs must be at least 1", param="max_num_seqs")
        if self.max_num_batched_tokens < 1:
            raise TidalError("--max-num-batched-tokens must be at least 1", param="max_num_batched_tokens")
        if self.long_prefill_token_threshold < 0:
            raise TidalError("--long-prefill-token-threshold must be 0 (off) or more", param="long_prefill_token_threshold")
        if self.short_prefill_tokens < 0:
            raise TidalError("--short-prefill-tokens must be 0 (off) or more", param="short_prefill_tokens")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise TidalError("--max-model-len must be at least 1", param="max_model_len")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise TidalError("--num-kv-blocks must be at least 1", param="num_kv_blocks")
        if self.quant_head not in ("none", "int8", "int4", "w8a8"):
            raise TidalError("--quant-head must be none, int8, int4 or w8a8", param="quant_head")
        if self.quant not in WEIGHT_QUANTS:
            raise TidalError(f"--quant must be {', '.join(WEIGHT_QUANTS[:-1])} or {WEIGHT_QUANTS[-1]}", param="quant")
        if self.kv_quant not in ("none", "int8", "int4"):
            raise TidalError("--kv-quant must be none, int8 or int4", param="kv_quant")
        if self.policy != "auto":
            from tidal.policy import Policy
            Policy.parse(self.policy)  # a malformed policy fails here, with the accepted forms
        if self.prompt_len < 0 or self.gen_len < 0:
            raise TidalError("--prompt-len and --gen-len must be positive (0: the planner's default)",
                             param="prompt_len")
        if self.load_format not in ("auto", "dummy"):
            raise TidalError("--load-format must be auto or dummy", param="load_format")
        self.kv_mem_bytes = parse_size(self.kv_mem, "kv_mem")
        self.device_mem_bytes = parse_size(self.device_mem, "device_mem")
        self.host_mem_bytes = parse_size(self.host_mem, "host_mem")
        self.torch_device = resolve_device(self.device)
        self.torch_dtype = resolve_dtype(self.dtype, self.torch_device)

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TidalError(f"unknown engine argument(s) {unknown}; known ones are {sorted(known)}")
        if model is not None:
            kwargs["model"] = model
        return cls(**kwargs)


# CLI flags built from EngineConfig: (field, type, help). `tidal` subcommands share these.
ENGINE_FLAGS = [
    ("model", str, "HF checkpoint directory, .gguf file, hub id, or alias (default: smollm2)"),
    ("tokenizer", str, "tokenizer directory, if not the model's"),
    ("device", str, "cpu, cuda, cuda:N or auto"),
    ("dtype", str, "auto, float32, bfloat16 or float16"),
    ("seed", int, "engine seed (requests without their own seed draw from it)"),
    ("max_model_len", int, "context length limit (default: the model's)"),
    ("block_size", int, "tokens per KV cache block"),
    ("kv_mem", str, "KV cache pool size, e.g. 2GiB"),
    ("num_kv_blocks", int, "KV cache pool size in blocks (overrides --kv-mem)"),
    ("max_num_seqs", int, "most sequences in one batch"),
    ("max_num_batched_tokens", int, "token budget of one engine step, so the prefill chunk (default "
     "1024; when serving, 2048 lowers TTFT and 512 steadies the streams decoding beside a prefill)"),
    ("long_prefill_token_threshold", int, "most tokens one prompt's prefill gets in a step (default 0: the whole "
                                          "budget); lower lets short or prefix-cached prompts go ahead of a long one"),
    ("short_prefill_tokens", int, "a waiting prompt that needs at most this many uncached tokens is scheduled "
                                  "before running prefills that need more (default 0: first come, first served); "
                                  "cuts the TTFT tail of prefix-cached requests queued behind a long cold prompt"),
    ("quant", str, "weight quantization: none, int8, int4, or w8a8 (int8 weights and int8 activations rounded per "
                   "token, smoothed per channel on calibration text at load: tidal's AVX-512 VNNI GEMM (oneDNN's where the "
                   "CPU has AMX), about 2x bf16's matmul speed for batches; CPU only; SmolLM2 perplexity +0.9%%, so opt-in)"),
    ("quant_head", str, "LM head quantization, group 32: none (default: the checkpoint's precision), int8 "
                        "(symmetric, GGUF Q8_0's grid; needs AVX-512 VNNI), int4 (perplexity +5.5%% on SmolLM2) or "
                        "w8a8 (per row, activations rounded per token: for batches; CPU only); "
                        "a bf16 head is ~1/3 of an int4 model's batch-1 decode step"),
    ("kv_quant", str, "KV cache quantization: none, int8, int4"),
    ("device_mem", str, "device memory budget, e.g. 16GiB"),
    ("host_mem", str, "host memory budget, e.g. 64GiB"),
    ("offload_dir", str, "directory for weights offloaded to disk (written once, reused on the next start); "
                         "not needed when the policy's disk layers map a safetensors checkpoint in place"),
    ("policy", str, "where weights/KV live and how a step is batched: auto (all resident unless --host-mem / "
                    "--device-mem limit memory; then the planner's choice, as `tidal plan` prints it), or e.g. 'w=20,80,0 kv=0,100,0 bs=32 mb=4 cpu-attn=on' "
                    "(percent on device,host,disk; bs sequences per micro-batch; mb micro-batches share each "
                    "layer load), or FlexGen's six --percent numbers '20 80 0 100 0 100'"),
    ("prompt_len", int, "typical prompt length, for --policy auto's planner (default 512)"),
    ("gen_len", int, "typical number of generated tokens, for --policy auto's planner (default 32)"),
    ("load_format", str, "auto, or dummy (random weights, no files)"),
    ("generation_config", str, "default sampling for requests that leave it unset: auto (the checkpoint's "
                               "generation_config.json; the smollm2 alias: its model card's temperature 0.2, "
                               "top_p 0.9), vllm (ignore it: temperature 1), or a folder holding one"),
]


def add_engine_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ("seed",)) -> None:
    """Every engine flag on an argparse parser (the CLI, `tidal serve`, `tidal batch`, `tidal bench`);
    `--seed` is the sampling seed on chat/generate, so the engine's is skipped there."""
    g = p.add_argument_group("engine")
    for name, typ, help_text in ENGINE_FLAGS:
        if name in skip:
            continue
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_text)
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                   help="turn prefix caching off")
    g.add_argument("--no-jump-forward", dest="enable_jump_forward", action="store_false", default=None,
                   help="structured output: sample every token, even where the grammar allows only one "
                        "(the output is the same either way; jump-forward only saves decode steps)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine flags a parsed command line set, as EngineConfig keyword arguments."""
    names = [n for n, _, _ in ENGINE_FLAGS if n != "seed"] + ["enable_prefix_caching", "enable_jump_forward"]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
