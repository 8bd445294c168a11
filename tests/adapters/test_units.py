"""LoRA slots and adapter packing on tiny random models (fast): empty slots change nothing, a packed peft adapter
computes what peft computes (also through onnxruntime's own adapter API), refusals name their reason, and the
adapter manifest contract."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from device.engine import Engine, EngineOptions, arch_from_hf_config
from device.engine.adapters import Adapter, AdapterBaseError, AdapterSet, UnknownAdapterError, check_fits
from export import fuse_gqa
from export.adapters import AdapterSourceError, pack, read_peft, write_adapter_file
from export.checkpoint import SafetensorsReader
from export.direct import build_direct
from export.quantize import RECIPES
from manifests import (
    LORA_SITES,
    AdapterBase,
    AdapterBaseMismatchError,
    AdapterManifest,
    LoraSpec,
    Provenance,
    SigningKey,
    TrustStore,
    UnsupportedFormatError,
    check_adapter_base,
    lora_input_names,
    verify_adapter,
    verify_bundle,
    write_signed_adapter_manifest,
)

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)  # fmt: skip
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = np.random.default_rng(1).integers(0, 128, 20)


def _model(model_type: str, root: Path) -> tuple[Any, Any, Path]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **TINY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    folder = root / model_type
    model.save_pretrained(folder)
    return cfg, model, folder


def _peft(model: Any, root: Path, targets: list[str], **kw: Any) -> tuple[Any, Path]:
    """A peft LoRA with random non-zero A and B (init_lora_weights=False), saved as a PEFT folder."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(target_modules=targets, init_lora_weights=False, lora_dropout=0.0, **kw))
    pm.eval()
    for name, p in pm.named_parameters():  # peft's random init is tiny; make the delta clearly visible
        if "lora_" in name:
            p.data.mul_(4.0)
    out = root / "peft"
    pm.save_pretrained(out)
    return pm, out


def _engine(cfg: Any, model: Any, root: Path, sites: tuple[str, ...] = LORA_SITES) -> Engine:
    out = root / "graph"
    built = fuse_gqa.build_gqa_model(cfg.to_dict(), fuse_gqa.weights_from_torch(model), 64, sites)
    fuse_gqa.save_model(built, out)
    spec = fuse_gqa.gqa_graph_spec(cfg.num_hidden_layers, lora=fuse_gqa.lora_slots(cfg.to_dict(), sites))
    arch = arch_from_hf_config(cfg.to_dict())
    return Engine.from_parts(out, arch, spec, EngineOptions(threads=1), tokenizer_path=None)


def _manifest(name: str = "tuned", sha: str = "0" * 64) -> AdapterManifest:
    return AdapterManifest(
        name=name, version=1, created_at=dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc),
        base=AdapterBase(name="base", version=1, manifest_sha256=sha),
        lora=LoraSpec(rank=4, alpha=8, scale=2.0, target_modules=["q_proj"], sites=["qkv"], layers=[0], parameters=1),
        files=[], provenance=Provenance(source="x", source_kind="folder"),
    )  # fmt: skip


def _adapter(engine: Engine, path: Path, name: str = "tuned") -> Adapter:
    params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    nbytes = check_fits(_manifest(name), params, engine.lora_slots)
    return Adapter(name, 1, path, _manifest(name), dict(params), nbytes)


def _torch_logp(model: Any, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor(ids)[None]).logits[0, :-1].double(), -1).numpy()


def _engine_logp(engine: Engine, ids: np.ndarray, adapter: Any = None) -> np.ndarray:
    return np.concatenate([lp for _, lp in engine.log_probs(ids.tolist(), adapter)]).astype(np.float64)


@pytest.mark.parametrize("recipe", [None, "int8"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_empty_lora_slots_compute_exactly_the_graph_without_them(model_type: str, recipe: str | None,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    cfg, _model_, folder = _model(model_type, tmp_path)
    ck = SafetensorsReader(folder)
    r = RECIPES[recipe] if recipe else None
    plain = build_direct(cfg.to_dict(), ck.get, ck.has, tmp_path / "plain", r, 64)
    slotted = build_direct(cfg.to_dict(), ck.get, ck.has, tmp_path / "slots", r, 64, lora_sites=LORA_SITES)
    arch = arch_from_hf_config(cfg.to_dict())
    spec = fuse_gqa.gqa_graph_spec(cfg.num_hidden_layers, lora=fuse_gqa.lora_slots(cfg.to_dict(), LORA_SITES))
    opts, plain_spec = EngineOptions(threads=1), fuse_gqa.gqa_graph_spec(cfg.num_hidden_layers)
    with Engine.from_parts(tmp_path / "plain", arch, plain_spec, opts, tokenizer_path=None) as a, \
            Engine.from_parts(tmp_path / "slots", arch, spec, opts, tokenizer_path=None) as b:  # fmt: skip
        np.testing.assert_array_equal(_engine_logp(a, IDS), _engine_logp(b, IDS))
        assert len(b.lora_slots) == 2 * len(LORA_SITES) * cfg.num_hidden_layers and not a.lora_slots
    assert plain.outcome.notes == slotted.outcome.notes
    # each slot is a graph input with a rank-0 default of the same name (onnxruntime's overridable initializer)
    import onnx

    g = onnx.load(str(tmp_path / "slots" / "model.onnx"), load_external_data=False).graph
    a0, b0 = lora_input_names(0, "qkv")
    inits = {t.name: list(t.dims) for t in g.initializer}
    assert inits[a0] == [cfg.hidden_size, 0] and inits[b0][0] == 0
    assert [i.name for i in g.input] == spec.input_names


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_packed_adapter_computes_what_peft_computes(model_type: str, tmp_path: Path) -> None:
    """All seven projections, a per-module rank and alpha, rsLoRA: the engine's log-probabilities with the packed
    adapter equal torch + peft's; without it, the base's."""
    cfg, model, _folder = _model(model_type, tmp_path)
    engine = _engine(cfg, model, tmp_path)  # the graph is built before peft wraps the model's modules
    pm, peft_dir = _peft(model, tmp_path, ALL, r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 2},
                         alpha_pattern={"down_proj": 3.0})  # fmt: skip
    adapter = read_peft(peft_dir)
    assert adapter.rank == 4 and adapter.target_modules == sorted(ALL) and not adapter.is_noop
    packed = pack(adapter, engine.arch, fuse_gqa.lora_slots(cfg.to_dict(), LORA_SITES))
    assert packed.sites == list(LORA_SITES) and packed.layers == [0, 1]
    a, b = packed.params["lora.0.qkv.a"], packed.params["lora.0.qkv.b"]
    assert a.shape == (64, 2 + 4 + 4) and b.shape == (10, 64 + 32 + 32)  # q rank 2, k and v rank 4
    assert not b[:2, 64:].any() and not b[2:6, :64].any()  # block-diagonal: q's rows only in q's columns
    write_adapter_file(packed, tmp_path / "a.onnx_adapter", 1, 1)
    loaded = _adapter(engine, tmp_path / "a.onnx_adapter")
    with engine:
        got = _engine_logp(engine, IDS, loaded)
        np.testing.assert_allclose(got, _torch_logp(pm, IDS), atol=2e-4)
        with pm.disable_adapter():
            np.testing.assert_allclose(_engine_logp(engine, IDS), _torch_logp(pm, IDS), atol=2e-4)
        assert np.abs(got - _engine_logp(engine, IDS)).max() > 0.05  # the adapter changes the model


def test_onnxruntimes_own_adapter_api_fills_the_same_slots(tmp_path: Path) -> None:
    """The file is onnxruntime's adapter format: RunOptions.add_active_adapter on a plain Run gives the logits
    the engine's IO binding gives (the engine binds instead: active adapters do nothing in RunWithBinding)."""
    cfg, model, _folder = _model("llama", tmp_path)
    engine = _engine(cfg, model, tmp_path, ("qkv", "o"))
    _pm, peft_dir = _peft(model, tmp_path, ["q_proj", "v_proj", "o_proj"], r=4, lora_alpha=8)
    packed = pack(read_peft(peft_dir), engine.arch, fuse_gqa.lora_slots(cfg.to_dict(), ("qkv", "o")))
    write_adapter_file(packed, tmp_path / "a.onnx_adapter", 1, 1)
    n, hd = IDS.shape[0], cfg.hidden_size // cfg.num_attention_heads
    feeds: dict[str, Any] = {"input_ids": IDS[None].astype(np.int64), "seqlens_k": np.array([n - 1], np.int32),
                             "total_sequence_length": np.array(n, np.int32), "logits_index": np.arange(n)}  # fmt: skip
    for i in range(cfg.num_hidden_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, cfg.num_key_value_heads, 64, hd), np.float32)
    sess = ort.InferenceSession(str(tmp_path / "graph" / "model.onnx"), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(tmp_path / "a.onnx_adapter"))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(lora)
    theirs = sess.run(["logits"], feeds, run_options)[0][0]
    with engine:
        state = engine.new_state(n, _adapter(engine, tmp_path / "a.onnx_adapter"))
        ours = engine.forward(state, IDS)
        base = sess.run(["logits"], feeds)[0][0]  # nothing fed: the rank-0 defaults, the base model
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        assert np.abs(theirs - base).max() > 1e-2


def test_refusals_name_what_the_bundle_cannot_carry(tmp_path: Path) -> None:
    cfg, model, _folder = _model("llama", tmp_path)
    slots = fuse_gqa.lora_slots(cfg.to_dict(), ("qkv",))
    arch = arch_from_hf_config(cfg.to_dict())
    _pm, peft_dir = _peft(model, tmp_path, ["q_proj", "down_proj"], r=2, lora_alpha=4)
    with pytest.raises(AdapterSourceError, match="down_proj.*only on qkv.*--lora-sites including down"):
        pack(read_peft(peft_dir), arch, slots)
    with pytest.raises(AdapterSourceError, match="no LoRA slots"):
        pack(read_peft(peft_dir), arch, None)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    for change, match in (({"use_dora": True}, "DoRA"), ({"bias": "all"}, "bias='none'"),
                          ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"peft_type": "IA3"}, "only LORA"),
                          ({"r": 3}, "rank 2 in the weights but 3")):  # fmt: skip
        (peft_dir / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(AdapterSourceError, match=match):
            read_peft(peft_dir)
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    weights = str(peft_dir / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "q_proj.lora_B" not in k}, weights)
    with pytest.raises(AdapterSourceError, match="q_proj has lora_A but not both"):
        read_peft(peft_dir)
    with pytest.raises(AdapterSourceError, match="adapter_config.json not found"):
        read_peft(tmp_path)
    other = dict(TINY, hidden_size=32, intermediate_size=48)  # another model's adapter: shapes differ
    from transformers import AutoConfig

    small = fuse_gqa.lora_slots(AutoConfig.for_model("llama", **other).to_dict(), ("qkv", "down"))
    (peft_dir / "adapter_model.safetensors").unlink()
    save_file(tensors, str(peft_dir / "adapter_model.safetensors"))
    with pytest.raises(AdapterSourceError, match="another model's adapter"):
        pack(read_peft(peft_dir), arch, small)


def test_check_fits_refuses_matrices_the_graph_cannot_take(tmp_path: Path) -> None:
    slots = {"lora.0.qkv.a": (64, "r"), "lora.0.qkv.b": ("r", 128)}
    ov = ort.OrtValue.ortvalue_from_numpy
    good = {"lora.0.qkv.a": ov(np.zeros((64, 4), np.float32)), "lora.0.qkv.b": ov(np.zeros((4, 128), np.float32))}
    assert check_fits(_manifest(), good, slots) == 4 * (64 * 4 + 4 * 128)
    cases = [
        ({}, "no LoRA slots"),
        ({**good, "lora.1.qkv.a": good["lora.0.qkv.a"]}, "not a LoRA slot"),
        ({"lora.0.qkv.a": ov(np.zeros((32, 4), np.float32)), "lora.0.qkv.b": good["lora.0.qkv.b"]}, "takes float"),
        ({"lora.0.qkv.a": good["lora.0.qkv.a"]}, "has no lora.0.qkv.b"),
        ({"lora.0.qkv.a": good["lora.0.qkv.a"], "lora.0.qkv.b": ov(np.zeros((3, 128), np.float32))}, "rank 4"),
    ]
    for i, (params, match) in enumerate(cases):
        with pytest.raises(AdapterBaseError, match=match):
            check_fits(_manifest(), params, slots if i else {})


def test_adapter_set_add_replace_remove() -> None:
    s = AdapterSet()
    one, two = (Adapter("a", v, Path("x"), _manifest("a"), {}) for v in (1, 2))
    assert s.add(one) is None and s.add(two) is one and s.get("a") is two  # replaced; the old one lives on
    with pytest.raises(Exception, match="already loaded"):
        s.add(one, replace=False)
    assert s.remove("a") is two and s.names() == []
    with pytest.raises(UnknownAdapterError, match="no adapter named 'a'"):
        s.get("a")


def test_adapter_manifest_is_its_own_signed_kind(tmp_path: Path) -> None:
    key = SigningKey.generate()
    trust = TrustStore([key.public_key])
    m = _manifest(sha="ab" * 32)
    assert AdapterManifest.from_yaml(m.to_yaml()) == m
    write_signed_adapter_manifest(tmp_path, m, key)
    assert verify_adapter(tmp_path, trust) == m
    with pytest.raises(UnsupportedFormatError, match="not a nanofleet bundle manifest.*nanofleet-adapter"):
        verify_bundle(tmp_path, trust)
    check_adapter_base(m, "base", "ab" * 32)
    with pytest.raises(AdapterBaseMismatchError, match="built for base base@1 .*abababababab.*not for the loaded b2"):
        check_adapter_base(m, "b2", "cd" * 32)
    with pytest.raises(AdapterBaseMismatchError, match="has no manifest"):
        check_adapter_base(m, "b2", None)
    (tmp_path / "manifest.yaml").write_text(m.to_yaml().replace("format: nanofleet-adapter", "format: other"))
    with pytest.raises(Exception, match="does not match"):
        verify_adapter(tmp_path, trust)


def test_slots_survive_the_prepacked_weights_cache(tmp_path: Path) -> None:
    """The cache saves onnxruntime's optimized graph: the slots must stay inputs there (not folded as constants)."""
    cfg, model, _folder = _model("llama", tmp_path)
    plain = _engine(cfg, model, tmp_path)
    _pm, peft_dir = _peft(model, tmp_path, ["q_proj", "down_proj"], r=2, lora_alpha=4)
    packed = pack(read_peft(peft_dir), plain.arch, fuse_gqa.lora_slots(cfg.to_dict(), LORA_SITES))
    write_adapter_file(packed, tmp_path / "a.onnx_adapter", 1, 1)
    spec = fuse_gqa.gqa_graph_spec(cfg.num_hidden_layers, lora=fuse_gqa.lora_slots(cfg.to_dict(), LORA_SITES))
    opts = EngineOptions(threads=1, weights_cache=str(tmp_path / "cache"))
    with plain, Engine.from_parts(tmp_path / "graph", plain.arch, spec, opts, tokenizer_path=None) as cached:
        assert cached.weights == "mapped" and cached.lora_slots == plain.lora_slots
        want = _engine_logp(plain, IDS, _adapter(plain, tmp_path / "a.onnx_adapter"))
        np.testing.assert_allclose(_engine_logp(cached, IDS, _adapter(cached, tmp_path / "a.onnx_adapter")), want,
                                   atol=1e-5)  # fmt: skip
        np.testing.assert_allclose(_engine_logp(cached, IDS), _engine_logp(plain, IDS), atol=1e-5)
