"""--offload-dir: decoder layers written once as safetensors files, memory-mapped from then on.

Owns: `OffloadStore` (one `layer_NNN.safetensors` per streamed layer, after fusing and quantizing,
in a subdirectory named by what the files derive from; a file is reused on the next start when
its fingerprint matches) and `checkpoint_identity` (the checkpoint files' names, sizes and
modification times, dtype, quantization, dummy seed).
Must not: decide which layers go to disk (weights/placement.py) or copy at step time (prefetch.py).
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from tidal.errors import TidalError

_FORMAT = 2  # bump when the file contents change meaning (2: int8pack and w8a8 layers pack more tensors)


def checkpoint_identity(checkpoint, dtype: torch.dtype, quant: str, dummy_seed: int | None) -> dict:
    """What the offloaded files derive from; "files" is None when the source has no files to
    fingerprint (an in-memory model), and then nothing is reused."""
    path = str(checkpoint.path)
    files = None
    if os.path.isdir(path):
        names = [os.path.join(path, "config.json")] + sorted(getattr(checkpoint, "_shards", None) or [])
        if dummy_seed is None and not getattr(checkpoint, "_shards", None):
            names = []
        files = [(os.path.basename(n), os.stat(n).st_size, os.stat(n).st_mtime_ns) for n in names if os.path.isfile(n)]
    elif os.path.isfile(path):
        st = os.stat(path)
        files = [(os.path.basename(path), st.st_size, st.st_mtime_ns)]
    return {"format": _FORMAT, "model": path, "files": files or None, "dtype": str(dtype), "quant": quant,
            "dummy_seed": dummy_seed}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class OffloadStore:
    def __init__(self, root: str, identity: dict):
        self.identity = identity
        slug = os.path.basename(identity["model"].rstrip("/")) or "model"
        self.dir = os.path.join(root, f"{slug}-{_hash(identity)[:12]}")
        self.handles: list = []   # open safetensors files: their mappings back the layer sources
        self.num_written = 0

    def path(self, i: int) -> str:
        return os.path.join(self.dir, f"layer_{i:03d}.safetensors")

    def _fingerprint(self, i: int, key_layout) -> str:
        sig = [(e.name, list(e.shape), str(e.dtype)) for e in key_layout.entries]
        return _hash([self.identity, i, sig])

    def has(self, i: int, key_layout) -> bool:
        """Whether layer i's file exists and was written from this very source and layout."""
        if self.identity["files"] is None or not os.path.isfile(self.path(i)):
            return False
        from safetensors import safe_open
        try:
            with safe_open(self.path(i), framework="pt") as f:
                return (f.metadata() or {}).get("tidal") == self._fingerprint(i, key_layout)
        except Exception:  # truncated or foreign file: write it again
            return False

    def write(self, i: int, key_layout, layout) -> None:
        """Write layer i (`layout`'s tensors as they are bound now); `key_layout` is the layout before
        quantization, which `has` checks against on the next start."""
        from safetensors.torch import save_file
        try:
            os.makedirs(self.dir, exist_ok=True)
            tensors = {e.name: t.detach().to("cpu").contiguous() for e, t in zip(layout.entries, layout.current())}
            tmp = self.path(i) + ".tmp"
            save_file(tensors, tmp, metadata={"tidal": self._fingerprint(i, key_layout)})
            # flushed before it counts as written: a crash cannot leave a valid-looking partial file,
            # and the run that follows does not stream its layers while the kernel writes them back
            # (measured here: the first run after writing read them at 3 GB/s instead of 17)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path(i))
        except OSError as e:
            raise TidalError(f"cannot write offloaded weights to '{self.dir}' ({e}); pass an --offload-dir "
                             "on a disk with room for the offloaded layers", param="offload_dir") from None
        self.num_written += 1

    def ops(self, i: int, layout) -> list:
        """Copy operations from layer i's file (memory-mapped) into `layout`'s entries."""
        from safetensors import safe_open
        f = safe_open(self.path(i), framework="pt")
        self.handles.append(f)
        ops, names = [], set(f.keys())
        for j, e in enumerate(layout.entries):
            t = f.get_tensor(e.name) if e.name in names else None   # a view of the mapping, not a read
            if t is None or t.shape != e.shape or t.dtype != e.dtype:
                raise TidalError(f"'{self.path(i)}' does not match the model's layer {i} ({e.name}); "
                                 f"delete '{self.dir}' and start again", param="offload_dir")
            ops.append((t, j, None))
        return ops
