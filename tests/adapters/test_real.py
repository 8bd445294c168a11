"""Adapters on the real default model: peft LoRAs trained on CPU, bundled by `nanofleet export-adapter` over bases
built by the current exporter (fp32, int8, int4), run by the device engine."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from device.engine import Engine, EngineOptions, SamplingParams, arch_from_hf_config
from device.engine.adapters import AdapterBaseError, AdapterRejectedError, UnknownAdapterError
from export.checkpoint import SafetensorsReader
from export.direct import build_direct
from export.fuse_gqa import gqa_graph_spec
from manifests import (
    BundleManifest,
    SigningKey,
    TrustStore,
    manifest_sha256,
    read_manifest_unverified,
    verify_adapter,
    write_signed_manifest,
)

from . import fixtures

pytestmark = pytest.mark.slow
DATA = Path(__file__).parent / "data"
GREENHOUSE = (DATA / "greenhouse_manual.txt").read_text()
OPTS = EngineOptions(threads=2, spin_wait=False)


def _torch_peft_logits(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(with the qv adapter, without) logits [n, vocab] of torch + peft on the default model's fp32 weights."""
    import torch
    from peft import PeftModel

    from export.sources import load_model, resolve_source

    model = PeftModel.from_pretrained(load_model(resolve_source(None)), str(fixtures.peft_adapter("qv"))).eval()
    inp = torch.tensor([ids])
    with torch.no_grad():
        adapted = model(input_ids=inp).logits[0].numpy()
        with model.disable_adapter():
            base = model(input_ids=inp).logits[0].numpy()
    return adapted, base


def test_export_adapter_signs_a_small_gated_bundle_bound_to_its_base(
    qv_int8: tuple[Path, dict], base_int8: Path, trust: TrustStore
) -> None:
    out, summary = qv_int8
    m = verify_adapter(out, trust)
    assert m.base.manifest_sha256 == manifest_sha256(base_int8)
    assert m.base.name == read_manifest_unverified(base_int8).name
    assert (m.lora.rank, m.lora.alpha, m.lora.scale) == (8, 16.0, 2.0)
    assert m.lora.target_modules == ["q_proj", "v_proj"] and m.lora.sites == ["qkv"]
    assert m.lora.layers == list(range(30))
    q = m.quality
    assert q is not None and q.passed, q
    ppl = {e.what: e.perplexity for e in q.evals}
    assert ppl["engine:base+adapter"] < 0.8 * ppl["engine:base"], ppl  # tuned on this very text
    assert abs(ppl["engine:base+adapter"] / ppl["torch+peft"] - 1) < 0.03, ppl
    assert abs(ppl["engine:base"] / ppl["torch:base"] - 1) < 0.03, ppl
    assert q.vs_reference.kl_mean < q.vs_reference.limits.kl_mean_limit and q.effect.kl_mean > 0.01
    # q and v of 30 layers at rank 8, packed into the qkv slot: A [576, 16] + B [16, 960] fp32 per layer
    assert m.lora.parameters == 30 * (576 * 16 + 16 * 960)
    assert summary["adapter_bytes"] < 1.05 * 4 * m.lora.parameters < 0.03 * summary["base_model_bytes"]


def test_engine_logits_with_the_adapter_equal_torch_peft(base_fp32: Path, trust: TrustStore) -> None:
    adapter_dir, _ = fixtures.adapter_bundle("qv", "fp32")
    with Engine.from_bundle(base_fp32, trust, OPTS) as engine:
        engine.load_adapter(adapter_dir, trust)
        ids = engine.encode(GREENHOUSE, add_special_tokens=False)[:96]
        got = engine.forward(engine.new_state(len(ids), "qv"), ids)  # [n, vocab]
        got_base = engine.forward(engine.new_state(len(ids)), ids)
    want, want_base = _torch_peft_logits(ids)
    for g, w in ((got, want), (got_base, want_base)):
        scale = float(np.abs(w).max())
        assert np.abs(g - w).max() <= 2e-3 * scale, np.abs(g - w).max()
        assert (g.argmax(-1) == w.argmax(-1)).mean() >= 0.98
    assert np.abs(want - want_base).max() > 1.0 and np.abs(got - got_base).max() > 1.0  # the adapter matters


def test_merged_and_unmerged_agree(base_fp32: Path, trust: TrustStore, tmp_path: Path) -> None:
    """peft's merge_and_unload, exported as a plain fp32 graph, vs the fp32 base + the unmerged adapter."""
    merged_dir = fixtures.merged_model("qv")
    ck = SafetensorsReader(merged_dir)
    import json

    config = json.loads((merged_dir / "config.json").read_text())
    build_direct(config, ck.get, ck.has, tmp_path / "merged", None, 1024)
    arch = arch_from_hf_config(config)
    adapter_dir, _ = fixtures.adapter_bundle("qv", "fp32")
    with Engine.from_bundle(base_fp32, trust, OPTS) as unmerged, \
            Engine.from_parts(tmp_path / "merged", arch, gqa_graph_spec(arch.num_layers), OPTS,
                              tokenizer_path=base_fp32 / "tokenizer.json") as merged:  # fmt: skip
        unmerged.load_adapter(adapter_dir, trust)
        ids = unmerged.encode(GREENHOUSE, add_special_tokens=False)
        a = np.concatenate([lp for _, lp in unmerged.log_probs(ids, "qv")])
        b = np.concatenate([lp for _, lp in merged.log_probs(ids)])
        assert np.abs(a - b).max() < 2e-3, np.abs(a - b).max()
        assert abs(unmerged.perplexity(ids, "qv") / merged.perplexity(ids) - 1) < 1e-4
        prompt = ids[:40]
        assert unmerged.greedy(prompt, 16, "qv") == merged.greedy(prompt, 16)


# int4 (issue 21): the int4 recipe used to re-quantize the default model's Q4_1 weights to another 4-bit grid;
# that second rounding (base alone: mean KL 0.24 on this text) took this qv LoRA to KL 0.62 and perplexity 6.35
# against torch+peft's 2.75, and torch+peft over those same weights gave 6.33: the slots were right, the base was
# not. It keeps the source's grid now (export/quantize.py); tests/adapters/test_int4_lora.py covers a 4-bit RTN base.
@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_every_precision_of_the_base_takes_the_adapter(precision: str, trust: TrustStore) -> None:
    """The same LoRA over each precision: the gate (engine vs torch+peft, base precision's limits) passed, and the
    adapter moves the model toward its text at every precision."""
    out, summary = fixtures.adapter_bundle("qv", precision)
    q = verify_adapter(out, trust).quality
    assert q is not None and q.passed and summary["quality"]["passed"]
    ppl = {e.what: e.perplexity for e in q.evals}
    assert ppl["engine:base+adapter"] < 0.8 * ppl["engine:base"], ppl
    limit = {"fp32": 0.005, "int8": 0.03, "int4": 0.3}[precision]
    assert abs(ppl["engine:base+adapter"] / ppl["torch+peft"] - 1) < limit, ppl


def test_an_adapter_on_every_projection_with_rslora(all_int8: tuple[Path, dict], trust: TrustStore) -> None:
    m = verify_adapter(all_int8[0], trust)
    assert m.lora.sites == ["qkv", "o", "gate_up", "down"] and m.lora.use_rslora and m.lora.scale == 4.0
    assert m.quality is not None and m.quality.passed and m.quality.effect.kl_mean > 0.01


def test_the_adapter_continues_its_own_text(engine_int8: Engine) -> None:
    ids = engine_int8.encode(GREENHOUSE, add_special_tokens=False)
    at = len(engine_int8.encode(GREENHOUSE[: GREENHOUSE.index("When it blinks amber")], add_special_tokens=False))
    prompt, truth = ids[: at + 4], ids[at + 4 : at + 16]

    def hits(tokens: list[int]) -> int:
        return sum(a == b for a, b in zip(tokens, truth, strict=False))

    tuned, base, other = (engine_int8.greedy(prompt, len(truth), a) for a in ("qv", None, "all"))
    assert hits(tuned) > hits(base) and hits(tuned) >= len(truth) // 2, (tuned, base, truth)
    assert other != tuned  # another adapter over the same base answers differently


def test_a_mismatched_base_is_refused_with_a_reason(
    base_fp32: Path, base_int8: Path, qv_int8: tuple[Path, dict], trust: TrustStore, adapter_keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    with Engine.from_bundle(base_fp32, trust, OPTS) as engine:
        with pytest.raises(AdapterBaseError, match="built for base .*int8.*not for the loaded") as err:
            engine.load_adapter(qv_int8[0], trust)
        assert err.value.reason == "adapter_base_mismatch" and engine.adapters.names() == []
    # the same weights, re-signed: another manifest, another base
    copy = tmp_path / "resigned"
    shutil.copytree(base_int8, copy)
    m = read_manifest_unverified(copy)
    write_signed_manifest(copy, BundleManifest.model_validate({**m.model_dump(), "version": m.version + 1}),
                          SigningKey.load(adapter_keys[0]))  # fmt: skip
    with Engine.from_bundle(copy, trust, OPTS) as engine, pytest.raises(AdapterBaseError, match="manifest sha256"):
        engine.load_adapter(qv_int8[0], trust)


def test_an_unsigned_or_tampered_adapter_is_refused(
    engine_int8: Engine, qv_int8: tuple[Path, dict], trust: TrustStore, tmp_path: Path
) -> None:
    def copy(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(qv_int8[0], d)
        return d

    tampered = copy("tampered")
    data = bytearray((tampered / "adapter.onnx_adapter").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tampered / "adapter.onnx_adapter").write_bytes(bytes(data))
    unsigned = copy("unsigned")
    (unsigned / "manifest.sig").unlink()
    edited = copy("edited")
    (edited / "manifest.yaml").write_text((edited / "manifest.yaml").read_text().replace("rank: 8", "rank: 9"))
    other_key = TrustStore([SigningKey.generate().public_key])
    for path, store, match in ((tampered, trust, "sha256"), (unsigned, trust, "manifest.sig is missing"),
                               (edited, trust, "does not match"), (qv_int8[0], other_key, "unknown key")):  # fmt: skip
        with pytest.raises(AdapterRejectedError, match=match) as err:
            engine_int8.load_adapter(path, store)
        assert err.value.reason == "adapter_rejected"
    assert engine_int8.adapters.names() == ["all", "qv"]  # nothing replaced by a refused one


def test_adapters_unload_and_reload_without_touching_the_base_or_running_streams(
    engine_int8: Engine, qv_int8: tuple[Path, dict], trust: TrustStore
) -> None:
    prompt = engine_int8.encode("The controller opens the roof vents when", add_special_tokens=False)
    want = engine_int8.greedy(prompt, 24, "qv")
    base_before = engine_int8.greedy(prompt, 8)
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    stream = engine_int8.generate(prompt, params, adapter="qv")
    got = [next(stream) for _ in range(8)]
    engine_int8.unload_adapter("qv")
    try:
        with pytest.raises(UnknownAdapterError):
            engine_int8.generate(prompt, params, adapter="qv")
        got += list(stream)  # the running stream keeps the adapter it started with
        assert got == want
        assert engine_int8.greedy(prompt, 8) == base_before
    finally:
        engine_int8.load_adapter(qv_int8[0], trust)
    assert engine_int8.greedy(prompt, 24, "qv") == want  # reloaded from the same bundle: the same adapter
