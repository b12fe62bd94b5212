"""ggml tensor bytes -> torch tensors: the dequantization half of reading a GGUF file.

Owns: the ggml type ids tidal handles itself (F32, F16, BF16, Q4_0, Q4_1, Q8_0) and `dequantize`,
one tensor's raw bytes (a slice of the file's memory map) -> a fresh CPU tensor, in numpy for the
block types and through gguf.quants for every other type.
Must not: open or parse GGUF files, map tensor names or permute rows (gguf_file.py does those).
"""

import numpy as np
import torch

from tidal.errors import TidalError

# ggml type ids (gguf.GGMLQuantizationType); the ones dequantized here rather than by gguf.quants
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_FLOAT_TYPES = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}


def dequantize(raw: np.ndarray, ggml_type: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """uint8 bytes of one tensor -> a fresh tensor of `shape` in `dtype` (never a view of the file).

    numpy, not torch, does the arithmetic: it is single-threaded, and each of torch's OpenMP
    parallel regions stalls for milliseconds when the cores are busy (measured on 2 busy cores:
    SmolLM2 0.5 s this way vs 17-27 s with torch ops). The operations are gguf.quants' own
    (d * q + m in float32), so results match it bit for bit.
    """
    if ggml_type in _FLOAT_TYPES:
        values = torch.from_numpy(raw.view(np.uint16 if ggml_type != F32 else np.float32).copy())
        return values.view(_FLOAT_TYPES[ggml_type]).reshape(shape).to(dtype)
    if ggml_type in (Q4_0, Q4_1, Q8_0):
        values = _dequantize_blocks(raw, ggml_type)
    else:
        values = _dequantize_fallback(raw, ggml_type)
    return torch.from_numpy(values.reshape(shape)).to(dtype)


def _dequantize_blocks(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    if ggml_type == Q8_0:  # 34-byte blocks: fp16 scale, 32 int8
        blocks = raw.reshape(-1, 34)
        values = blocks[:, 2:].view(np.int8).astype(np.float32)
        values *= _fp16_column(blocks, 0)
        return values
    # Q4_0 / Q4_1: 18/20-byte blocks: fp16 scale (, fp16 min), then 16 bytes of nibbles
    head = 2 if ggml_type == Q4_0 else 4
    blocks = raw.reshape(-1, head + 16)
    packed = blocks[:, head:]
    q = np.empty((blocks.shape[0], 32), dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=q[:, :16])  # value j < 16: low nibble of byte j
    np.right_shift(packed, 4, out=q[:, 16:])  # value j >= 16: high nibble of byte j - 16
    if ggml_type == Q4_0:
        values = (q.view(np.int8) - np.int8(8)).astype(np.float32)
        values *= _fp16_column(blocks, 0)
    else:
        values = q.astype(np.float32)
        values *= _fp16_column(blocks, 0)
        values += _fp16_column(blocks, 2)
    return values


def _fp16_column(blocks: np.ndarray, byte: int) -> np.ndarray:
    """The fp16 stored at `byte` of every block, as a float32 column."""
    return blocks[:, byte : byte + 2].copy().view(np.float16).astype(np.float32)


def _dequantize_fallback(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
    except ValueError:
        raise TidalError(f"GGUF tensor type {ggml_type} is unknown to tidal and gguf", param="model")
    return np.asarray(gguf.quants.dequantize(np.asarray(raw), qtype), dtype=np.float32)
