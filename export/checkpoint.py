"""Read a checkpoint's tensors one at a time, as fp32 numpy arrays in Hugging Face's layout ([out, in] for a
linear weight), without loading the model: the direct builder and the streamed reference ask for one layer's
weights, use them, and drop them, so peak memory is one layer plus the embedding table.

``SafetensorsReader``: a Hugging Face folder (``*.safetensors``, sharded or not, any float dtype: bf16 and
fp16 are widened to fp32 per tensor). ``GGUFCheckpoint``: a ``.gguf`` file, memory-mapped by the gguf package
and dequantized per tensor (Q4_0/Q4_1/Q8_0/K-quants/F16/F32: ``gguf.dequantize``); names are mapped with the
gguf package's own table, and the Q/K rows of llama-architecture files are un-permuted as transformers'
GGUF loader does (llama.cpp permutes them for its rotary layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import CorruptSourceError


class MissingTensorError(CorruptSourceError):
    """The checkpoint lacks a tensor its architecture needs."""

    reason = "corrupt_source"


class Checkpoint(Protocol):
    def get(self, name: str) -> np.ndarray:
        """The tensor as fp32 (HF layout); MissingTensorError when absent."""
        ...

    def has(self, name: str) -> bool: ...

    def close(self) -> None: ...


class SafetensorsReader:
    """The ``*.safetensors`` files of a Hugging Face folder, each tensor read when asked for.

    Each read opens its file and closes it again: a handle kept open maps the whole file, and every page a read
    touched stays in this process's resident set (measured: 1.3 GB after reading half of TinyLlama-1.1B), which
    would put the whole checkpoint back into the export's peak memory. Opening costs a header parse."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = folder
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CorruptSourceError(f"{folder} has no *.safetensors weights (the direct builder reads those)")
        self._where: dict[str, Path] = {}
        try:
            for f in files:
                with safe_open(str(f), framework="pt") as h:  # pt: bf16 has no numpy dtype
                    for k in h.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                        self._where[k] = f
        except Exception as exc:  # a truncated or foreign file
            raise CorruptSourceError(f"cannot read the safetensors weights in {folder}: {exc}") from exc

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        import torch
        from safetensors import safe_open

        f = self._where.get(name)
        if f is None:
            raise MissingTensorError(f"the checkpoint in {self.folder} has no tensor {name}")
        try:
            with safe_open(str(f), framework="pt") as h:
                return h.get_tensor(name).to(torch.float32).numpy()
        except OSError:
            raise
        except Exception as exc:
            raise CorruptSourceError(f"cannot read {name} from {f}: {exc}") from exc

    def close(self) -> None:
        self._where.clear()


class GGUFCheckpoint:
    """A GGUF file's tensors under Hugging Face names, dequantized to fp32 one at a time."""

    def __init__(self, path: Path, num_heads: int, num_kv_heads: int, num_layers: int) -> None:
        import gguf

        self.path = path
        try:
            self._reader = gguf.GGUFReader(str(path))
            arch = self._reader.fields["general.architecture"].contents()
        except Exception as exc:
            raise CorruptSourceError(f"cannot read the GGUF file {path}: {exc}") from exc
        match = [m for m, n in gguf.MODEL_ARCH_NAMES.items() if n == arch]
        if not match:
            raise CorruptSourceError(f"{path}: the gguf package knows no tensor names for architecture {arch!r}")
        self._map = gguf.get_tensor_name_map(match[0], num_layers)
        self._tensors = {t.name: t for t in self._reader.tensors}
        # llama.cpp's converter permutes the rows of Q and K of llama-architecture models (Mistral GGUFs are
        # "llama" too) for its rotary layout; transformers' LlamaTensorProcessor undoes it, and so do we.
        self._permute = arch == "llama"
        self._heads = {"attn_q": num_heads, "attn_k": num_kv_heads}

    def _gguf_name(self, name: str) -> str | None:
        base, _, suffix = name.rpartition(".")
        mapped = self._map.get_name(base)
        return f"{mapped}.{suffix}" if mapped else None

    def has(self, name: str) -> bool:
        mapped = self._gguf_name(name)
        return mapped is not None and mapped in self._tensors

    def get(self, name: str) -> np.ndarray:
        import gguf

        mapped = self._gguf_name(name)
        t = self._tensors.get(mapped or "")
        if t is None:
            raise MissingTensorError(f"the GGUF file {self.path} has no tensor for {name} ({mapped})")
        w = np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)  # a copy: the data is memory-mapped
        self._release(t)
        kind = mapped.split(".")[2] if mapped and mapped.count(".") >= 3 else ""
        if self._permute and kind in self._heads and w.ndim >= 1:
            w = _unpermute(w, self._heads[kind])
        return w

    def _release(self, t: Any) -> None:
        """Drop the file pages this read touched from the resident set (the reader maps the whole file; they
        stay cached by the kernel, but no longer count as this process's memory)."""
        import mmap

        mm = getattr(self._reader.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        start = int(t.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
        length = int(t.data_offset) + int(t.n_bytes) - start
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, length)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self._tensors.clear()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (transformers' LlamaTensorProcessor._reverse_permute_weights)."""
    dim = w.shape[0] // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape))


def open_checkpoint(folder: Path, gguf_file: str | None, config: Any) -> Checkpoint:
    """The checkpoint of a resolved source (export/sources.py): its GGUF file, or its folder's safetensors."""
    if gguf_file:
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        return GGUFCheckpoint(folder / gguf_file, heads, kv, int(config.num_hidden_layers))
    return SafetensorsReader(folder)
