"""Build a fused-attention ONNX graph (GraphSpec.kind "gqa") straight from a Llama-family checkpoint.

Why: optimum's text-generation-with-past graph concatenates past and new keys in every layer at every
step (the whole KV cache is copied per token) and runs attention as a dozen small ops. This graph uses
onnxruntime's fused kernels instead, as onnxruntime-genai's builder does:

    Gather(embed) -> [SimplifiedLayerNorm | SkipSimplifiedLayerNorm] -> MatMul(packed QKV)
      -> GroupQueryAttention(rotary inside, past/present share ONE preallocated buffer)
      -> MatMul(o) -> SkipSimplifiedLayerNorm -> MatMul(packed gate|up) -> SiLU*up -> MatMul(down) -> ...
      -> SkipSimplifiedLayerNorm -> MatMul(Transpose(embed) or lm_head) -> logits

I/O (batch 1 is what the device engine drives, but the graph is batch-generic):
    input_ids              int64 [batch, seq]
    seqlens_k              int32 [batch]        total tokens - 1 (past + seq - 1)
    total_sequence_length  int32 []             past + seq
    logits_index           int64 [k]            which of the seq positions get logits (e.g. [seq - 1])
    past_key_values.{i}.key/value  float [batch, kv_heads, max_seq, head_dim]   the shared buffer
    lora.{i}.{site}.a / .b float [in, rank] / [rank, out]   optional LoRA slots (``lora_sites``): rank 0 = none
    -> logits [batch, k, vocab], present.{i}.key/value (same shape, bound to the same buffer)

Weights are plain fp32 MatMul/Gather initializers laid out like optimum's (a tied LM head is
MatMul(x, Transpose(E))), so export/quantize.py's MatMulNBits/GatherBlockQuantized recipes apply as is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from manifests import LORA_SITES, MODEL_FILE, ArchConfig, GraphSpec, LoraSite, LoraSlots, lora_input_names

from .errors import ExportError

GRAPH_KIND = "gqa"
PROTOBUF_LIMIT = 2_000_000_000


class FuseGqaError(ExportError):
    """The checkpoint cannot be built into a GQA graph, or the graph does not match the reference."""

    reason = "fuse_gqa"


# Which checkpoint roles (archs.TensorNames) each packed projection holds, in output order: a LoRA slot on a
# site serves every module packed into it (an adapter on q and v fills the q and v columns of the qkv slot).
SITE_ROLES: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"),
                                          "down": ("down",)}  # fmt: skip
# What `nanofleet export` gives a gqa graph unless told otherwise (--lora-sites): every projection, so any
# peft target_modules choice fits; their cost with no adapter active is measured in docs/benchmarks.md.
DEFAULT_LORA_SITES: tuple[str, ...] = LORA_SITES


def lora_slots(config: Mapping[str, Any], sites: Sequence[str]) -> LoraSlots | None:
    """The manifest's description of the LoRA slots the builder adds for ``sites`` (None for none)."""
    if not sites:
        return None
    bad = sorted(set(sites) - set(LORA_SITES))
    if bad:
        raise FuseGqaError(f"unknown LoRA site(s) {', '.join(bad)}; known: {', '.join(LORA_SITES)}")
    H = int(config["hidden_size"])
    nq = int(config["num_attention_heads"])
    nkv = int(config.get("num_key_value_heads") or nq)
    hd = int(config.get("head_dim") or H // nq)
    inter = int(config["intermediate_size"])
    width = {"q": nq * hd, "k": nkv * hd, "v": nkv * hd, "o": H, "gate": inter, "up": inter, "down": H}
    fan_in = {"qkv": H, "o": nq * hd, "gate_up": H, "down": inter}
    out = []
    for site in (s for s in LORA_SITES if s in sites):  # graph order, each once
        splits = [width[r] for r in SITE_ROLES[site]]
        out.append(LoraSite(name=site, in_features=fan_in[site], out_features=sum(splits),  # type: ignore[arg-type]
                            modules=[f"{r}_proj" for r in SITE_ROLES[site]], splits=splits))  # fmt: skip
    return LoraSlots(sites=out)


def gqa_graph_spec(num_layers: int, model_file: str = MODEL_FILE, lora: LoraSlots | None = None) -> GraphSpec:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    slots = [n for i in range(num_layers) for s in (lora.sites if lora else ()) for n in lora_input_names(i, s.name)]
    return GraphSpec(
        kind=GRAPH_KIND,
        model_file=model_file,
        input_names=["input_ids", "seqlens_k", "total_sequence_length", "logits_index", *past, *slots],
        output_names=["logits", *present],
        kv_dtype="float32",
        shared_kv_buffer=True,
        lora=lora,
    )


def load_safetensors_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json as a dict, fp32 numpy weights) of a Hugging Face checkpoint folder."""
    from safetensors.numpy import load_file

    root = Path(folder)
    config = json.loads((root / "config.json").read_text())
    weights: dict[str, np.ndarray] = {}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FuseGqaError(f"no *.safetensors in {root}")
    for f in files:
        for k, v in load_file(str(f)).items():
            weights[k] = v.astype(np.float32, copy=False)
    return config, weights


def weights_from_torch(model: Any) -> dict[str, np.ndarray]:
    """fp32 numpy weights of a loaded transformers model (build side only)."""
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


ROPE_SCALINGS = ("default", "linear", "llama3")


def _direct_spec(config: Mapping[str, Any]) -> tuple[Any, str | None]:
    from .archs import ARCHITECTURES

    arch = str(config.get("model_type", ""))
    spec = ARCHITECTURES.get(arch)
    if spec is None or spec.direct is None:
        supported = ", ".join(k for k, v in ARCHITECTURES.items() if v.direct is not None)
        return None, f"model_type {arch!r} is not supported by the GQA builder ({supported})"
    return spec.direct, spec.direct_unsupported(dict(config))


def unsupported_reason(config: Mapping[str, Any]) -> str | None:
    """Why the GQA builder would refuse this checkpoint config; None when it can build it. The export's
    default graph ("auto") asks this first and keeps optimum's graph for anything the builder does not know."""
    return _direct_spec(config)[1]


def _rope_caches(config: Mapping[str, Any], head_dim: int, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    theta = float(config.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))  # [hd/2]
    scaling = config.get("rope_scaling")
    positions = np.arange(max_seq, dtype=np.float64)  # [max_seq]
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind == "linear":
            positions = positions / float(scaling["factor"])
        elif kind == "llama3":
            factor = float(scaling["factor"])
            low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
            old_ctx = float(scaling["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv_freq
            smooth = (old_ctx / wavelen - low) / (high - low)
            scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
            mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
            inv_freq = np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
        elif kind != "default":
            raise FuseGqaError(f"rope_scaling {kind!r} is not supported by the GQA builder")
    freqs = np.outer(positions, inv_freq)  # [max_seq, hd/2]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` C-contiguous. The builder hands sinks transposed views ([K, N] of a checkpoint's [N, K] rows); torch's
    blocked, threaded transpose copies those several times faster than numpy's (seconds per layer of a 1B
    model otherwise)."""
    if a.flags.c_contiguous:
        return a
    if a.ndim == 2 and a.T.flags.c_contiguous:
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is on the build side
            return np.ascontiguousarray(a)
        return torch.from_numpy(a.T).t().contiguous().numpy()
    return np.ascontiguousarray(a)


class WeightSink(Protocol):
    """Where the graph's weights go and which nodes consume them. ``InlineWeights`` keeps fp32 initializers in
    the proto (the traced path quantizes the saved graph afterwards); export/direct.py's sink quantizes each
    weight as it arrives and writes it to external data, so only one layer is ever in memory."""

    def constant(self, name: str, array: np.ndarray) -> str:
        """A small constant (norm weights, rope caches, shapes): its initializer name."""
        ...

    def matmul(self, name: str, weight_name: str, x: str, weight: np.ndarray, out: str) -> list[Any]:
        """Nodes computing ``out = x @ weight`` (``weight`` [K, N] fp32); ``name`` is the MatMul's node name."""
        ...

    def embedding(self, table: np.ndarray, ids: str, out: str, tied: bool) -> list[Any]:
        """Nodes gathering rows of ``table`` [vocab, H]; ``tied``: lm_head() will read the same table."""
        ...

    def lm_head(self, x: str, weight: np.ndarray | None, out: str) -> list[Any]:
        """Nodes of ``out = x @ weight`` ([H, vocab]); ``weight`` None: the tied embedding table, transposed."""
        ...


class InlineWeights:
    """fp32 initializers inside the model proto, laid out like optimum's graph (a tied LM head is
    MatMul(x, Transpose(E))), so export/quantize.py's recipes apply to the saved graph as they do to optimum's."""

    EMBED = "model.embed_tokens.weight"

    def __init__(self) -> None:
        self.initializers: list[Any] = []

    def _init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(contiguous(array), name))
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        return self._init(name, array)

    def matmul(self, name: str, weight_name: str, x: str, weight: np.ndarray, out: str) -> list[Any]:
        from onnx import helper

        return [helper.make_node("MatMul", [x, self._init(weight_name, weight)], [out], name=name)]

    def embedding(self, table: np.ndarray, ids: str, out: str, tied: bool) -> list[Any]:
        from onnx import helper

        self._init(self.EMBED, table)
        return [helper.make_node("Gather", [self.EMBED, ids], [out], name="/model/embed_tokens/Gather")]

    def lm_head(self, x: str, weight: np.ndarray | None, out: str) -> list[Any]:
        from onnx import helper

        nodes = []
        if weight is None:
            head = "/lm_head/Transpose_output_0"
            nodes.append(helper.make_node("Transpose", [self.EMBED], [head], name="/lm_head/Transpose", perm=[1, 0]))
        else:
            head = self._init("lm_head.weight", weight)
        nodes.append(helper.make_node("MatMul", [x, head], [out], name="/lm_head/MatMul"))
        return nodes


class Observer(Protocol):
    """Sees each tensor group as the builder streams past it (export/reference.py runs the fp32 reference so)."""

    def embed(self, table: np.ndarray) -> None: ...

    def layer(self, i: int, tensors: Mapping[str, np.ndarray]) -> None: ...

    def head(self, final_norm: np.ndarray, weight: np.ndarray | None) -> None: ...


def build_gqa_model(
    config: Mapping[str, Any],
    weights: Mapping[str, np.ndarray],
    max_seq: int | None = None,
    lora_sites: Sequence[str] = (),
) -> Any:
    """The fused graph as an onnx.ModelProto with fp32 weights inside (from an in-memory weights dict)."""
    return build_gqa_graph(config, weights.__getitem__, weights.__contains__, InlineWeights(), max_seq,
                           lora_sites=lora_sites)  # fmt: skip


def build_gqa_graph(
    config: Mapping[str, Any],
    get: Callable[[str], np.ndarray],
    has: Callable[[str], bool],
    sink: WeightSink,
    max_seq: int | None = None,
    observer: Observer | None = None,
    on_layer_done: Callable[[int], None] | None = None,
    lora_sites: Sequence[str] = (),
) -> Any:
    """The fused graph as an onnx.ModelProto. Weights are fetched with ``get`` (checkpoint name -> fp32 array in
    HF layout) one layer at a time, handed to ``observer`` and to ``sink``, and dropped before the next layer.
    ``lora_sites`` (of LORA_SITES) get LoRA slots in every layer (``lora_slots`` describes them)."""
    direct, reason = _direct_spec(config)
    if reason:
        raise FuseGqaError(reason)
    b = _GraphBuilder(config, direct.names, get, has, sink, observer, lora_slots(config, lora_sites))
    b.embedding(int(max_seq or config.get("max_position_embeddings", 2048)))
    window = config.get(direct.sliding_window_attr) if direct.sliding_window_attr else None
    for i in range(b.layers):
        b.layer(i, window)
        if on_layer_done:
            on_layer_done(i)
    b.head()
    return b.model(str(config.get("model_type", "")))


class _GraphBuilder:
    """build_gqa_graph's state, one method per block of the graph (module doc): the nodes so far, the
    residual stream's tensor names, the LoRA slot inputs. Weights go to ``sink`` as each block is built."""

    def __init__(
        self,
        config: Mapping[str, Any],
        names: Any,
        get: Callable[[str], np.ndarray],
        has: Callable[[str], bool],
        sink: WeightSink,
        observer: Observer | None,
        slots: LoraSlots | None,
    ) -> None:
        self.names, self.get, self.has, self.sink, self.observer, self.slots = names, get, has, sink, observer, slots
        self.layers = int(config["num_hidden_layers"])
        hidden = int(config["hidden_size"])
        self.nq = int(config["num_attention_heads"])
        self.nkv = int(config.get("num_key_value_heads") or self.nq)
        self.hd = int(config.get("head_dim") or hidden // self.nq)
        self.inter = int(config["intermediate_size"])
        self.vocab = int(config["vocab_size"])
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.tied = bool(config.get("tie_word_embeddings", False)) or not has(names.lm_head)
        self.config = config
        self.nodes: list[Any] = []
        self.lora_inputs: list[Any] = []
        self.residual = "embeddings"
        self.pending: str | None = None  # the last sub-layer output, not yet added to the residual

    def w(self, name: str) -> np.ndarray:
        if not self.has(name):
            raise FuseGqaError(f"checkpoint lacks {name}")
        return self.get(name)

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs: Any) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))

    def project(self, i: int, site: str, name: str, weight_name: str, x: str, weight: np.ndarray, out: str) -> None:
        """``out = x @ weight``, plus ``(x @ A) @ B`` from the layer's LoRA slot when ``site`` has one."""
        from onnx import TensorProto, helper

        if self.slots is None or self.slots.site(site) is None:
            self.nodes.extend(self.sink.matmul(name, weight_name, x, weight, out))
            return
        self.nodes.extend(self.sink.matmul(name, weight_name, x, weight, out + "/base"))
        a, b = lora_input_names(i, site)
        rank = f"lora_rank_{i}_{site}"  # one symbol per slot: an adapter's rank may differ per layer
        k, n = weight.shape
        self.lora_inputs.extend([helper.make_tensor_value_info(a, TensorProto.FLOAT, [k, rank]),
                                 helper.make_tensor_value_info(b, TensorProto.FLOAT, [rank, n])])  # fmt: skip
        # rank-0 defaults (an overridable initializer of the same name): a run that feeds nothing gets the base
        # model, and onnxruntime's own RunOptions.add_active_adapter can fill the slots in a plain Run
        self.sink.constant(a, np.zeros((k, 0), dtype=np.float32))
        self.sink.constant(b, np.zeros((0, n), dtype=np.float32))
        lp = name.rsplit("/", 1)[0]
        self.node("MatMul", [x, a], [f"{lp}/lora/down"], f"{lp}/lora/MatMul_a")  # [b, s, rank]
        self.node("MatMul", [f"{lp}/lora/down", b], [f"{lp}/lora/delta"], f"{lp}/lora/MatMul_b")  # [b, s, out]
        self.node("Add", [out + "/base", f"{lp}/lora/delta"], [out], f"{lp}/lora/Add")

    def embedding(self, ctx: int) -> None:
        """The token embedding (Gather; also the tied LM head's table) and the rotary caches."""
        table = self.w(self.names.embed)  # [vocab, H]
        if self.observer:
            self.observer.embed(table)
        self.nodes.extend(self.sink.embedding(table, "input_ids", "embeddings", self.tied))  # [b, s, H]
        del table
        cos, sin = _rope_caches(self.config, self.hd, ctx)
        self.sink.constant("cos_cache", cos)  # [ctx, hd/2]
        self.sink.constant("sin_cache", sin)

    def layer(self, i: int, window: Any) -> None:
        """Decoder layer ``i``: its weights are fetched, built into the graph and dropped here."""
        names = self.names.layer(i)
        t = {role: self.w(n) for role, n in names.items() if not role.endswith("_bias") or self.has(n)}
        if self.observer:
            self.observer.layer(i, {names[r]: a for r, a in t.items()})
        x = self.input_norm(i, t["input_norm"])
        o = self.attention(i, t, x, window)
        lp, p = f"/model/layers.{i}", f"model.layers.{i}"
        ln2 = self.sink.constant(f"{p}.post_attention_layernorm.weight", t["post_norm"])
        x2, res2 = f"{lp}/post_attention_layernorm/output_0", f"{lp}/post_attention_layernorm/residual"
        self.node("SkipSimplifiedLayerNormalization", [o, self.residual, ln2], [x2, "", "", res2],
                  f"{lp}/post_attention_layernorm", domain="com.microsoft", epsilon=self.eps)  # fmt: skip
        self.residual = res2
        self.pending = self.mlp(i, t, x2)

    def input_norm(self, i: int, weight: np.ndarray) -> str:
        """The layer's input RMSNorm; from layer 1 on it also adds the previous layer's MLP output to the
        residual (SkipSimplifiedLayerNormalization)."""
        lp = f"/model/layers.{i}"
        ln1 = self.sink.constant(f"model.layers.{i}.input_layernorm.weight", weight)
        x = f"{lp}/input_layernorm/output_0"
        if self.pending is None:
            self.node("SimplifiedLayerNormalization", [self.residual, ln1], [x], f"{lp}/input_layernorm",
                      axis=-1, epsilon=self.eps, stash_type=1)  # fmt: skip
        else:
            new_res = f"{lp}/input_layernorm/residual"
            self.node("SkipSimplifiedLayerNormalization", [self.pending, self.residual, ln1], [x, "", "", new_res],
                      f"{lp}/input_layernorm", domain="com.microsoft", epsilon=self.eps)  # fmt: skip
            self.residual = new_res
        return x

    def attention(self, i: int, t: dict[str, np.ndarray], x: str, window: Any) -> str:
        """Packed QKV (+ biases), GroupQueryAttention with rotary inside and the shared KV buffer, o_proj."""
        lp, p = f"/model/layers.{i}", f"model.layers.{i}"
        # packed QKV: [H, (nq + 2 nkv) hd]
        qkv = f"{lp}/attn/qkv_proj/output_0"
        wqkv = np.concatenate([t["q"], t["k"], t["v"]], axis=0).T  # rows packed (a memcpy), then a [K, N] view
        self.project(i, "qkv", f"{lp}/attn/qkv_proj/MatMul", f"{p}.self_attn.qkv_proj.weight", x, wqkv, qkv)
        del wqkv
        if "q_bias" in t:
            b = self.sink.constant(
                f"{p}.self_attn.qkv_proj.bias", np.concatenate([t["q_bias"], t["k_bias"], t["v_bias"]])
            )
            self.node("Add", [qkv, b], [qkv + "_biased"], f"{lp}/attn/qkv_proj/Add")
            qkv += "_biased"
        attn = f"{lp}/attn/GroupQueryAttention/output_0"
        gqa_attrs: dict[str, Any] = {"num_heads": self.nq, "kv_num_heads": self.nkv, "do_rotary": 1,
                                     "rotary_interleaved": 0, "scale": 1.0 / math.sqrt(self.hd)}  # fmt: skip
        if window:
            gqa_attrs["local_window_size"] = int(window)
        self.node("GroupQueryAttention",
                  [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                   "total_sequence_length", "cos_cache", "sin_cache"],
                  [attn, f"present.{i}.key", f"present.{i}.value"], f"{lp}/attn/GroupQueryAttention",
                  domain="com.microsoft", **gqa_attrs)  # fmt: skip
        o = f"{lp}/attn/o_proj/output_0"
        self.project(i, "o", f"{lp}/attn/o_proj/MatMul", f"{p}.self_attn.o_proj.weight", attn, t["o"].T, o)
        return o

    def mlp(self, i: int, t: dict[str, np.ndarray], x2: str) -> str:
        """Packed gate|up, SiLU(gate) * up, down_proj; returns the output, added to the residual by the next
        norm."""
        lp, p = f"/model/layers.{i}", f"model.layers.{i}"
        gu, gate, up = (f"{lp}/mlp/{n}" for n in ("gate_up", "gate", "up"))
        wgu = np.concatenate([t["gate"], t["up"]], axis=0).T  # packed gate|up: [H, 2 inter] (a view)
        self.project(i, "gate_up", f"{lp}/mlp/gate_up_proj/MatMul", f"{p}.mlp.gate_up_proj.weight", x2, wgu, gu)
        del wgu
        split = self.sink.constant(f"{lp}/mlp/split_sizes", np.array([self.inter, self.inter], dtype=np.int64))
        self.node("Split", [gu, split], [gate, up], f"{lp}/mlp/Split", axis=-1)
        sig, act, prod = (f"{lp}/mlp/{n}" for n in ("sigmoid", "silu", "act"))
        self.node("Sigmoid", [gate], [sig], f"{lp}/mlp/Sigmoid")
        self.node("Mul", [gate, sig], [act], f"{lp}/mlp/SiLU")
        self.node("Mul", [act, up], [prod], f"{lp}/mlp/Mul")
        out = f"{lp}/mlp/down_proj/output_0"
        self.project(i, "down", f"{lp}/mlp/down_proj/MatMul", f"{p}.mlp.down_proj.weight", prod, t["down"].T, out)
        return out

    def head(self) -> None:
        """The final norm and the LM head, over the rows ``logits_index`` asks for."""
        final_norm = self.w(self.names.final_norm)
        lnf = self.sink.constant("model.norm.weight", final_norm)
        self.node("SkipSimplifiedLayerNormalization", [self.pending, self.residual, lnf], ["/model/norm/output_0"],
                  "/model/norm", domain="com.microsoft", epsilon=self.eps)  # fmt: skip
        # Only the rows asked for go through the LM head: generation needs the last one (a prefill of n tokens
        # skips n-1 of the [H x vocab] products and the [n, vocab] logits buffer); perplexity asks for all.
        self.node("Gather", ["/model/norm/output_0", "logits_index"], ["/lm_head/rows"], "/lm_head/Gather", axis=1)
        head = None if self.tied else self.w(self.names.lm_head)  # [vocab, H]
        if self.observer:
            self.observer.head(final_norm, head)
        self.nodes.extend(self.sink.lm_head("/lm_head/rows", None if head is None else head.T, "logits"))
        del head

    def model(self, arch: str) -> Any:
        """The graph's I/O (module doc) around the nodes, as a ModelProto."""
        from onnx import TensorProto, helper

        f32 = TensorProto.FLOAT
        kv_shape = ["batch_size", self.nkv, "max_sequence_length", self.hd]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
            helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["logits_length"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "logits_length", self.vocab])]
        for i in range(self.layers):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", f32, kv_shape))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", f32, kv_shape))
        inputs.extend(self.lora_inputs)  # after the KV inputs: the order gqa_graph_spec lists them in
        initializers = getattr(self.sink, "initializers", [])
        graph = helper.make_graph(self.nodes, f"{arch}-gqa", inputs, outputs, initializer=initializers)
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="nanofleet.fuse_gqa")
        model.ir_version = 8
        return model


def save_model(model: Any, out_dir: str | Path, model_file: str = MODEL_FILE) -> Path:
    """Save, with external data when the weights pass protobuf's 2 GB limit."""
    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / model_file
    # Sum the weights, not model.ByteSize(): protobuf refuses to even measure a message past 2 GB.
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes > PROTOBUF_LIMIT - 64 * 1024**2:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=model_file + "_data",  # model.onnx_data: the name optimum and the bundle use
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def build_gqa_folder(
    hf_dir: str | Path, out_dir: str | Path, max_seq: int | None = None, model_file: str = MODEL_FILE
) -> GraphSpec:
    """Checkpoint folder (config.json + safetensors) -> out_dir/model.onnx; returns its GraphSpec."""
    config, weights = load_safetensors_folder(hf_dir)
    save_model(build_gqa_model(config, weights, max_seq), out_dir, model_file)
    return gqa_graph_spec(int(config["num_hidden_layers"]), model_file)


def fuse_for_export(
    model: Any,
    out_dir: Path,
    reference_dir: Path,
    arch: ArchConfig,
    token_ids: list[int],
    threads: int | None = None,
    model_file: str = MODEL_FILE,
    lora_sites: Sequence[str] = (),
) -> tuple[Path, GraphSpec]:
    """The export pipeline's hook: build the fused graph from the loaded torch model, then prove it equals
    the validated optimum graph in ``reference_dir`` (same perplexity, same greedy tokens) through the device
    engine before it goes on to quantization and the quality gate."""
    from device.engine import Engine, EngineOptions, optimum_kv_graph

    config = model.config.to_dict()
    weights = weights_from_torch(model)
    save_model(build_gqa_model(config, weights, arch.context_length, lora_sites), out_dir, model_file)
    spec = gqa_graph_spec(arch.num_layers, model_file, lora_slots(config, lora_sites))
    ids = list(token_ids)[: min(256, arch.context_length)]
    opts = EngineOptions(threads=threads)
    ref = Engine.from_parts(reference_dir, arch, optimum_kv_graph(arch.num_layers), opts, tokenizer_path=None)
    try:
        ref_ppl, ref_tokens = ref.perplexity(ids), ref.greedy(ids[:32], 16)
    finally:
        ref.close()
    with Engine.from_parts(out_dir, arch, spec, opts) as fused:
        ppl, tokens = fused.perplexity(ids), fused.greedy(ids[:32], 16)
    if abs(ppl - ref_ppl) > 1e-3 * ref_ppl or tokens != ref_tokens:
        raise FuseGqaError(
            f"the fused GQA graph does not reproduce the reference: perplexity {ppl:.4f} vs {ref_ppl:.4f}, "
            f"greedy tokens {'equal' if tokens == ref_tokens else 'differ'}"
        )
    return out_dir / model_file, spec


def main(argv: list[str] | None = None) -> None:
    import argparse
    import shutil

    ap = argparse.ArgumentParser(description="Build the fused GQA graph of a Llama-family checkpoint folder.")
    ap.add_argument("hf_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--max-seq", type=int, default=None)
    a = ap.parse_args(argv)
    spec = build_gqa_folder(a.hf_dir, a.out_dir, a.max_seq)
    (Path(a.out_dir) / "graph.json").write_text(spec.model_dump_json(indent=2) + "\n")
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        src = Path(a.hf_dir) / name
        if src.is_file():
            shutil.copy(src, Path(a.out_dir) / name)


if __name__ == "__main__":
    main()
