"""Random-weight models with real configs, saved as local Hugging Face folders (a source kind of export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TINYLLAMA_CONFIG = REPO / "export" / "configs" / "tinyllama-1.1b-chat-v1.0.json"
EVAL_TEXT = REPO / "export" / "eval_text" / "default.txt"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(vocab_size: int = 400) -> Any:
    """A small byte-level BPE trained on the shipped eval text: a real tokenizer.json, made offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([EVAL_TEXT.read_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_random_model(folder: Path, config: Any, seed: int = 0) -> Path:
    """Build a random-weight model from ``config`` and save it (+ a tokenizer) as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    train_tokenizer().save_pretrained(folder)
    return folder


def tinyllama_config(**overrides: Any) -> Any:
    """TinyLlama-1.1B's real config, with ``overrides`` (fewer layers, smaller hidden) for CI."""
    from transformers import LlamaConfig

    data = json.loads(TINYLLAMA_CONFIG.read_text())
    data.update(overrides)
    return LlamaConfig(**{k: v for k, v in data.items() if k not in ("architectures", "model_type")})


# Reduced TinyLlama: same head_dim (64), same GQA ratio (8 query heads per KV head), same vocab and context.
REDUCED_TINYLLAMA = {
    "num_hidden_layers": 2,
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "intermediate_size": 1408,
}
