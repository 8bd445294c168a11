"""The gate's fp32 reference, streamed: transformers' own decoder layer run over the eval text one layer at a time.

The quality gate compares the quantized bundle's next-token distributions with fp32's at every position of the
eval text (export/teacher_forced.py). Teacher-forced scoring is one forward pass over the whole text, so it can
run layer by layer: the hidden states of all positions ([n, hidden], a few MB) go through layer i while the
direct builder has layer i's weights in hand (``fuse_gqa.Observer``), and the weights are dropped after. Peak
memory is one layer, not the model, and no fp32 graph is ever written or loaded (4.4 GB for TinyLlama-1.1B).

The layer is the family's transformers class (``DirectSpec.layer_class``: e.g. ``LlamaDecoderLayer``),
created on the meta device and given the checkpoint's tensors, with its rotary embedding, RMSNorm and a causal
(sliding-window where the family has one) mask: the model's reference math, not a re-implementation.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from .archs import DirectSpec


class StreamedReference:
    """A ``fuse_gqa.Observer``: after the builder has streamed past every layer, ``targets``/``log_probs`` hold
    the fp32 model's teacher-forced log-probabilities over ``token_ids`` ([n - 1] and [n - 1, vocab])."""

    def __init__(self, config: Any, direct: DirectSpec, token_ids: list[int], tied: bool) -> None:
        import torch

        module = importlib.import_module(direct.modeling)
        self._layer_cls = getattr(module, direct.layer_class)
        self._norm_cls = getattr(module, direct.norm_class)
        self._config = copy.deepcopy(config)
        self._config._attn_implementation = "sdpa"  # with the explicit mask below
        self._ids = torch.tensor(token_ids, dtype=torch.long)
        n = self._ids.shape[0]
        self._positions = torch.arange(n)[None]  # [1, n]
        rotary = getattr(module, direct.rotary_class)(config=self._config)
        dummy = torch.zeros(1, n, 1, dtype=torch.float32)
        self._rope = rotary(dummy, self._positions)  # (cos, sin) [1, n, head_dim]
        allowed = torch.ones(n, n, dtype=torch.bool).tril()  # [n, n]: position i sees j <= i
        window = getattr(config, direct.sliding_window_attr, None) if direct.sliding_window_attr else None
        if window and n > int(window):
            allowed &= ~torch.ones(n, n, dtype=torch.bool).tril(-int(window))
        self._mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, float("-inf"))  # additive [1, 1, n, n]
        self._tied = tied
        self._table: Any = None
        self._h: Any = None
        self.targets: np.ndarray | None = None
        self.log_probs: np.ndarray | None = None
        self.seconds = 0.0

    def embed(self, table: np.ndarray) -> None:
        import torch

        t0 = time.perf_counter()
        t = torch.from_numpy(table)
        self._h = t[self._ids][None].clone()  # [1, n, hidden]
        if self._tied:
            self._table = t  # the LM head reads it at the end
        self.seconds += time.perf_counter() - t0

    def layer(self, i: int, tensors: Mapping[str, np.ndarray]) -> None:
        import torch

        t0 = time.perf_counter()
        prefix = f"model.layers.{i}."
        with torch.device("meta"):
            layer = self._layer_cls(self._config, layer_idx=i)
        state = {k.removeprefix(prefix): torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        layer.load_state_dict(state, strict=True, assign=True)
        layer.eval()
        with torch.no_grad():
            out = layer(self._h, attention_mask=self._mask, position_ids=self._positions,
                        position_embeddings=self._rope)  # fmt: skip
        self._h = out[0] if isinstance(out, tuple) else out
        del layer, state
        self.seconds += time.perf_counter() - t0

    def head(self, final_norm: np.ndarray, weight: np.ndarray | None) -> None:
        import torch

        t0 = time.perf_counter()
        norm = self._norm_cls(final_norm.shape[0], eps=float(getattr(self._config, "rms_norm_eps", 1e-6)))
        with torch.no_grad():
            norm.weight.copy_(torch.from_numpy(final_norm))
            h = norm(self._h)[0, :-1]  # [n - 1, hidden]: position j predicts token j + 1
            w = self._table if weight is None else torch.from_numpy(weight)  # [vocab, hidden]
            logits = h @ w.T  # [n - 1, vocab]
            for at in range(0, logits.shape[0], 128):  # float64 softmax, a slice at a time, in place
                logits[at : at + 128] = torch.log_softmax(logits[at : at + 128].double(), dim=-1).float()
        self.targets = self._ids[1:].numpy().astype(np.int64)
        self.log_probs = logits.numpy()
        self._table = self._h = None
        self.seconds += time.perf_counter() - t0

    @property
    def perplexity(self) -> float:
        assert self.targets is not None and self.log_probs is not None
        nll = -self.log_probs[np.arange(self.targets.shape[0]), self.targets].astype(np.float64).mean()
        return math.exp(nll)
