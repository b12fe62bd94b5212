"""`tidal quantize SRC DST`: write a checkpoint whose linear weights are already quantized, so that
start-up (`tidal ... --model DST`, `LLM(DST)`) loads them as they are instead of quantizing again.

Owns: the subcommand's flags and `quantize_checkpoint`, which streams SRC's tensors one at a time
(any checkpoint `--model` takes), quantizes those the model puts in a Linear / MergedLinear (it is
built on the meta device only to be asked), keeps GGUF Q4_1 blocks as they are for int4 in groups
of 32, and writes weights/quantized_dir.py's format into a temporary directory renamed to DST.
Must not: run the model, or define the file format (weights/quantized_dir.py does).
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
import time

from typing import TYPE_CHECKING

from tqdm import tqdm

from tidal.errors import TidalError

if TYPE_CHECKING:
    import torch

_DTYPES = ("float32", "bfloat16", "float16")   # torch is imported when a checkpoint is quantized, not for the flags


def add_quantize_parser(sub):
    p = sub.add_parser("quantize", help="write a checkpoint with quantized linear weights (loads without re-quantizing)")
    p.add_argument("src", help="HF checkpoint directory, .gguf file, hub id already cached, or alias (smollm2)")
    p.add_argument("dst", help="output directory (must not exist, or be empty)")
    p.add_argument("--quant", default="int4", help="int4 (default) or int8")
    p.add_argument("--group-size", type=int, default=None,
                   help="values per scale/min group (default: int4 32, int8 one group per row)")
    p.add_argument("--dtype", default="auto",
                   help="dtype of the tensors left unquantized (embeddings, norms): float32, bfloat16, float16, "
                        "or auto (the source's own; float32 for GGUF)")
    return p


def run_quantize(args) -> int:
    summary = quantize_checkpoint(args.src, args.dst, args.quant, args.group_size, args.dtype)
    print(f"wrote {summary['path']}: {summary['num_quantized']} weights as int{summary['bits']} "
          f"(group size {summary['group_size'] or 'per row'}), {summary['bytes'] / 2**20:.1f} MiB, "
          f"in {summary['seconds']:.1f} s")
    return 0


def quantize_checkpoint(src: str, dst: str, quant: str = "int4", group_size: int | None = None,
                        dtype: str = "auto", progress: bool = True) -> dict:
    """Quantize SRC's linear weights into a new directory DST; returns a summary dict."""
    import torch

    from tidal.model.layers.linear import Linear
    from tidal.model.registry import build_model
    from tidal.weights import quantized_dir
    from tidal.weights.generation_config import generation_defaults, write_generation_config
    from tidal.weights.loader import open_checkpoint
    from tidal.weights.quant import QuantizedWeight, dequantize, quantize
    from tidal.model.quantize import check_group_sizes

    t0 = time.perf_counter()
    bits = {"int4": 4, "int8": 8}.get(quant)
    if bits is None:
        raise TidalError(f"--quant {quant} is not supported by `tidal quantize`; use int4 or int8", param="quant")
    if group_size is not None and group_size <= 0:
        raise TidalError(f"--group-size {group_size} must be positive (leave it out for the default)", param="quant")
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise TidalError(f"'{dst}' already exists; remove it or pick another output directory")
    ckpt = open_checkpoint(src)
    if ckpt.quantization is not None:
        raise TidalError(f"'{ckpt.path}' is already quantized ({ckpt.quantization}); quantize the original instead",
                         param="model")
    torch_dtype = _resolve_dtype(dtype, ckpt)
    try:
        tokenizer = ckpt.load_tokenizer()
    except Exception as e:  # weights without tokenizer files still run with --tokenizer
        tokenizer = None
        print(f"tidal quantize: warning: no tokenizer in '{ckpt.path}' ({type(e).__name__}); DST gets none, "
              "so run it with --tokenizer", file=sys.stderr)
    meta_model = build_model(ckpt.hf_config, torch.device("meta"), torch_dtype)
    group_size = check_group_sizes(meta_model, bits, 0 if group_size is None else group_size)

    def linear_of(hf_name: str):
        """The Linear whose weight `hf_name` is, else None."""
        mapped = meta_model.map_weight_name(hf_name)
        if mapped is None or not mapped[0].endswith(".weight"):
            return None
        try:
            owner = meta_model.get_submodule(mapped[0].rsplit(".", 1)[0])
        except AttributeError:
            return None
        return owner if isinstance(owner, Linear) else None

    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dst)}.tmp-")
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make DST private
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small elementwise ops: see model/quantize.py
    try:
        writer, num_quantized = quantized_dir.ShardWriter(tmp), 0
        tensors = ckpt.iter_tensors(torch_dtype, keep_quantized=(bits, group_size))
        for name, t in tqdm(tensors, total=ckpt.num_tensors, desc="quantizing", unit=" tensors",
                            disable=not progress, leave=False):
            if linear_of(name) is not None:
                qw = t if isinstance(t, QuantizedWeight) else quantize(t, bits, group_size)
                writer.add(quantized_dir.split(name[: -len(".weight")], qw))
                num_quantized += 1
            else:
                writer.add({name: dequantize(t, torch_dtype) if isinstance(t, QuantizedWeight) else t})
        writer.finish()
        config = copy.deepcopy(ckpt.hf_config)
        setattr(config, quantized_dir.CONFIG_KEY, quantized_dir.quantization_entry(bits, group_size))
        config.dtype = torch_dtype
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        generation_config = os.path.join(ckpt.path, "generation_config.json")
        if os.path.isfile(generation_config):
            shutil.copy(generation_config, tmp)
        else:   # an alias's defaults (the GGUF has no file) travel with the directory
            write_generation_config(tmp, generation_defaults(src, ckpt.path)[0])
        if os.path.isdir(dst):
            os.rmdir(dst)  # empty (checked above)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return {"path": dst, "bits": bits, "group_size": group_size, "num_quantized": num_quantized,
            "bytes": writer.total_bytes, "seconds": time.perf_counter() - t0}


def _resolve_dtype(dtype: str, ckpt) -> "torch.dtype":
    import torch
    dtypes = {name: getattr(torch, name) for name in _DTYPES}
    if dtype in dtypes:
        return dtypes[dtype]
    if dtype != "auto":
        raise TidalError(f"--dtype {dtype} is not supported; use auto, float32, bfloat16 or float16", param="dtype")
    own = getattr(ckpt.hf_config, "dtype", None) if ckpt.format == "hf" else None
    own = dtypes.get(own, own) if isinstance(own, str) else own
    return own if own in dtypes.values() else torch.float32
