"""The adapter's quality report: base + adapter through the device engine against torch + peft (the fine-tune
as it was trained), and against the base alone (what the adapter changes), teacher-forced on its eval text.

The reference is the base's own source checkpoint in fp32 with peft's unmerged LoRA layers: the same numbers
the user's fine-tune computes. The engine side is the signed base bundle (any precision) with the staged
adapter loaded by ``Engine.load_adapter``: the code the boards run. The comparison is judged by the base
precision's gate limits (KL, same top token, perplexity), so an int8 base + adapter is held to what the int8
base alone was held to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from manifests import AdapterEffect, AdapterEval, AdapterQuality, BundleManifest

from .. import teacher_forced as tf
from ..gate import PRECISION_DEFAULTS

# An adapter whose outputs differ from the base's by less than this (mean KL per token, nats) changes nothing
# worth shipping: a peft adapter saved before training (B = 0) gives exactly 0.
DEFAULT_MIN_EFFECT_KL = 1e-3
EFFECT = "effect"


@dataclass(frozen=True)
class TorchScores:
    targets: np.ndarray  # [n - 1]
    adapter: np.ndarray  # [n - 1, vocab] log-softmax, torch + peft
    base: np.ndarray  # [n - 1, vocab] log-softmax, torch base alone


def torch_scores(model_src: Any, peft_dir: Path, ids: list[int]) -> TorchScores:
    """One teacher-forced forward pass of the fp32 source with peft's LoRA on, and one with it off."""
    import torch
    from peft import PeftModel

    from ..sources import load_model

    model = load_model(model_src)
    peft_model = PeftModel.from_pretrained(model, str(peft_dir))
    peft_model.eval()
    inp = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        adapted = torch.log_softmax(peft_model(input_ids=inp).logits[0, :-1].double(), dim=-1).float().numpy()
        with peft_model.disable_adapter():
            base = torch.log_softmax(peft_model(input_ids=inp).logits[0, :-1].double(), dim=-1).float().numpy()
    del peft_model, model
    return TorchScores(np.asarray(ids[1:], dtype=np.int64), adapted, base)


def limits_for(base: BundleManifest) -> tf.Limits:
    """The base's own gate limits (nominal, as signed into its quality report), else its precision's defaults."""
    signed = base.quality.teacher_forced.limits if base.quality and base.quality.teacher_forced else None
    if signed is not None:
        return tf.Limits(signed.max_kl_mean, signed.min_top_token_match, signed.max_ppl_change_pct)
    return PRECISION_DEFAULTS[base.recipe.precision].limits()


def _ppl(targets: np.ndarray, logp: np.ndarray) -> float:
    return float(np.exp(-logp[np.arange(targets.shape[0]), targets].astype(np.float64).mean()))


def judge_adapter(
    engine: Any,
    adapter: Any,
    ref: TorchScores,
    ids: list[int],
    text_sha256: str,
    limits: tf.Limits,
    min_effect_kl: float = DEFAULT_MIN_EFFECT_KL,
) -> AdapterQuality:
    """Score ``engine`` (the base bundle) with and without ``adapter`` against ``ref`` over ``ids``."""
    vs_ref, effect = tf.Comparison(), tf.Comparison()
    at = 0
    eng_adapter, eng_base = [], []
    for (t_a, lp_a), (t_b, lp_b) in zip(engine.log_probs(ids, adapter), engine.log_probs(ids), strict=True):
        end = at + t_a.shape[0]
        if not (np.array_equal(t_a, t_b) and np.array_equal(t_a, ref.targets[at:end])):
            raise ValueError("the engine and the torch reference scored different tokens")
        vs_ref.add(t_a, ref.adapter[at:end], lp_a)
        effect.add(t_a, lp_b, lp_a)
        eng_adapter.append(lp_a[np.arange(t_a.shape[0]), t_a])
        eng_base.append(lp_b[np.arange(t_a.shape[0]), t_a])
        at = end
    judged = vs_ref.result(limits, "torch+peft")
    moved = effect.result(tf.Limits(max_kl_mean=1e9, min_top_token_match=0.0, max_ppl_change_pct=1e9), "base")
    ppl_base = float(np.exp(-np.concatenate(eng_base).astype(np.float64).mean()))
    ppl_adapter = float(np.exp(-np.concatenate(eng_adapter).astype(np.float64).mean()))
    failures = dict(judged.failures)
    if moved.kl_mean < min_effect_kl:
        failures[EFFECT] = (f"the adapter changes almost nothing: mean KL to the base alone {moved.kl_mean:.2e} "
                            f"nats, under the floor of {min_effect_kl:g} (an untrained adapter gives 0)")  # fmt: skip
    evals = [
        AdapterEval(what="engine:base", perplexity=round(ppl_base, 4)),
        AdapterEval(what="engine:base+adapter", perplexity=round(ppl_adapter, 4)),
        AdapterEval(what="torch+peft", perplexity=round(_ppl(ref.targets, ref.adapter), 4)),
        AdapterEval(what="torch:base", perplexity=round(_ppl(ref.targets, ref.base), 4)),
    ]
    return AdapterQuality(
        eval_text_sha256=text_sha256,
        tokens=judged.tokens,
        evals=evals,
        vs_reference=judged,
        effect=AdapterEffect(kl_mean=moved.kl_mean, top_token_changed=round(1.0 - moved.top_token_match, 6),
                             ppl_base=round(ppl_base, 4), ppl_adapter=round(ppl_adapter, 4),
                             min_kl_mean=min_effect_kl),  # fmt: skip
        passed=not failures,
        failures=failures,
    )
