"""The engine: a frozen config (ArchConfig + GraphSpec + EngineOptions), one loaded onnxruntime session,
and a per-request RunState holding the KV cache. Shaped like llama2.c: forward() is the whole model
call; generation is a short loop over it."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from manifests import (
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG_FILE,
    MANIFEST_NAME,
    TOKENIZER_FILE,
    ArchConfig,
    BundleManifest,
    GraphSpec,
    ManifestError,
    TrustStore,
    read_manifest_unverified,
    sha256_file,
    verify_bundle,
)
from manifests.runtime_compat import RuntimeIncompatibleError, check_local_runtime

from ._heap import release_free_heap
from .adapters import Adapter, AdapterSet, load_adapter
from .errors import (
    BundleLoadError,
    ContextWindowError,
    EngineClosedError,
    InvalidParamsError,
    NoTokenizerError,
)
from .graph import RunState, make_driver
from .options import EngineOptions, SamplingParams
from .providers import available_providers, check_session, choose_providers
from .sampling import Constraint, Sampler, TokenLogprob, token_logprob
from .session import load_session
from .text import ChatTemplate, IncrementalDecoder, StopMatcher


class TokenStream(Iterator[int]):
    """Streaming token ids of one generation. After it ends, ``finish_reason`` is "stop" (EOS or a stop
    token) or "length" (max_new_tokens or the context window). ``close()`` stops it early and frees the
    KV cache (the API calls it when a client disconnects)."""

    def __init__(
        self,
        engine: Engine,
        prompt: np.ndarray,
        params: SamplingParams,
        constraint: Constraint | None = None,
        logprobs: int | None = None,
        adapter: Adapter | None = None,
    ) -> None:
        self.prompt_tokens = int(prompt.shape[0])
        self.finish_reason: str | None = None
        self.generated: list[int] = []
        self.last_logprob: TokenLogprob | None = None  # of the token just yielded, when logprobs were asked
        self.adapter = adapter  # captured at the start: unloading it later does not change this stream
        self._gen = engine._generate_loop(prompt, params, self, constraint, logprobs, adapter)

    def __next__(self) -> int:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        if self.finish_reason is None:
            self.finish_reason = "cancelled"


@dataclass
class TextEvent:
    """One step of a text stream: a text delta (maybe empty), the token that produced it, and on the last
    event the finish reason."""

    text: str
    token_id: int | None = None
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None  # of ``token_id``, when logprobs were asked


@dataclass
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str = "stop"


class Engine:
    """Runs one model. Thread-safe: concurrent requests each get their own RunState; the session is shared."""

    def __init__(
        self,
        model_path: Path,
        arch: ArchConfig,
        graph: GraphSpec,
        options: EngineOptions,
        tokenizer: Tokenizer | Path | None = None,
        chat_template: str | None = None,
        manifest: BundleManifest | None = None,
        generation_config: Mapping[str, Any] | None = None,
        manifest_sha256: str | None = None,
    ) -> None:
        self.arch = arch
        self.graph = graph
        self.options = options
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256  # of manifest.yaml's bytes: what adapters bind to
        self.adapters = AdapterSet()  # LoRA adapters resident over this base (device/engine/adapters.py)
        self.tokenizer: Tokenizer | None = None
        self.generation_config = dict(generation_config or {})
        self.model_path = model_path
        self.context_length = min(arch.context_length, options.max_context or arch.context_length)
        self._lock = threading.Lock()
        # A verified manifest vouches for the files' content: the weights cache keys on its hashes.
        hashes = {f.path: f.sha256 for f in manifest.files} if manifest is not None else None
        # The execution provider the bundle declares, when this onnxruntime has it (providers.py).
        declared = manifest.runtime.execution_providers if manifest is not None else []
        what = manifest.ref if manifest is not None else "the model"
        self.providers = choose_providers(declared, available_providers() if declared else [], bundle=what)
        self._session, self.weights = load_session(model_path, options, hashes, self.providers)
        check_session(declared, self.providers, self._session.get_providers(), bundle=what)
        release_free_heap()
        # The tokenizer (~30 MB for a 49k vocabulary) is built after the session: onnxruntime's load-time
        # transient then does not stack on top of it, which lowers the process's peak RSS by as much.
        self.tokenizer = _load_tokenizer(tokenizer) if isinstance(tokenizer, Path) else tokenizer
        release_free_heap()  # the tokenizer's JSON temporaries (_heap.py)
        self._driver = make_driver(self._session, arch, graph, self.context_length)
        self._chat: ChatTemplate | None = None
        if chat_template is not None:
            self._chat = ChatTemplate(
                chat_template, bos_token=self._token_text(arch.bos_token_id), eos_token=self._eos_text()
            )
        self.stop_token_ids: frozenset[int] = frozenset(arch.eos_token_ids)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_parts(
        cls,
        model_dir: str | Path,
        arch: ArchConfig,
        graph: GraphSpec,
        options: EngineOptions | None = None,
        tokenizer_path: str | Path | None = None,
        chat_template: str | Path | None = None,
    ) -> Engine:
        """Load without a manifest (the export-time quality gate). ``tokenizer_path`` defaults to
        ``model_dir/tokenizer.json`` when that exists; ``chat_template`` is template source text, or a Path
        to a file, defaulting to ``model_dir/chat_template.jinja`` when that exists."""
        root = Path(model_dir)
        tok_path = Path(tokenizer_path) if tokenizer_path is not None else root / TOKENIZER_FILE
        tokenizer = tok_path if (tokenizer_path is not None or tok_path.is_file()) else None
        if isinstance(chat_template, Path):
            template: str | None = _read_text(chat_template)
        elif chat_template is None and (root / CHAT_TEMPLATE_FILE).is_file():
            template = _read_text(root / CHAT_TEMPLATE_FILE)
        else:
            template = chat_template
        gen_cfg = _read_json(root / GENERATION_CONFIG_FILE)
        return cls(
            root / graph.model_file,
            arch,
            graph,
            options or EngineOptions(),
            tokenizer,
            template,
            None,
            gen_cfg,
        )

    @classmethod
    def from_bundle(
        cls, bundle_dir: str | Path, trust: TrustStore | None, options: EngineOptions | None = None
    ) -> Engine:
        """Load a bundle folder. With ``trust``, the signature, expiry and every file's sha256 are checked
        before any byte is parsed; without it the manifest is read unverified (local development)."""
        root = Path(bundle_dir)
        try:
            digest = sha256_file(root / MANIFEST_NAME) if (root / MANIFEST_NAME).is_file() else None
            manifest = verify_bundle(root, trust) if trust is not None else read_manifest_unverified(root)
            if digest != sha256_file(root / MANIFEST_NAME):  # replaced while being verified
                raise BundleLoadError(f"bundle {root} rejected: manifest.yaml changed while it was verified")
        except ManifestError as exc:
            raise BundleLoadError(f"bundle {root} rejected: {exc}") from exc
        try:
            check_local_runtime(manifest)
        except RuntimeIncompatibleError as exc:
            raise BundleLoadError(f"bundle {root} rejected: {exc.message}") from exc
        tok_entry = manifest.file("tokenizer")
        tok_path = root / (tok_entry.path if tok_entry else TOKENIZER_FILE)
        tokenizer = tok_path if tok_path.is_file() else None
        tmpl_entry = manifest.file("chat_template")
        tmpl_path = root / (tmpl_entry.path if tmpl_entry else CHAT_TEMPLATE_FILE)
        template = _read_text(tmpl_path) if tmpl_path.is_file() else None
        gen_entry = manifest.file("generation_config")
        gen_cfg = dict(manifest.generation) or _read_json(
            root / (gen_entry.path if gen_entry else GENERATION_CONFIG_FILE)
        )
        return cls(
            root / manifest.graph.model_file,
            manifest.arch,
            manifest.graph,
            options or EngineOptions(),
            tokenizer,
            template,
            manifest,
            gen_cfg,
            digest,
        )

    # ---------------------------------------------------------------- adapters

    def load_adapter(self, adapter_dir: str | Path, trust: TrustStore | None, replace: bool = True) -> Adapter:
        """Verify an adapter bundle (with ``trust``), check it was built for this exact base and fits its
        LoRA slots, and make it resident. The base is not reloaded and running streams are not touched; an
        adapter of the same name is replaced (its streams finish on the old one). Raises an ``AdapterError``."""
        self._live_driver()
        adapter = load_adapter(adapter_dir, trust, self.name, self.manifest_sha256, self.lora_slots)
        self.adapters.add(adapter, replace=replace)
        return adapter

    def unload_adapter(self, name: str) -> Adapter:
        """Stop offering an adapter; streams already running on it finish with it."""
        return self.adapters.remove(name)

    @property
    def lora_slots(self) -> dict[str, tuple[Any, ...]]:
        """The graph's LoRA slot inputs and their shapes (empty: this base cannot take adapters)."""
        return dict(getattr(self._live_driver(), "lora_shapes", {}))

    def _adapter(self, adapter: str | Adapter | None) -> Adapter | None:
        return self.adapters.get(adapter) if isinstance(adapter, str) else adapter

    # ---------------------------------------------------------------- identity

    @property
    def name(self) -> str:
        return self.manifest.name if self.manifest else self.model_path.parent.name

    @property
    def version(self) -> int | None:
        return self.manifest.version if self.manifest else None

    @property
    def closed(self) -> bool:
        return self._session is None

    def close(self) -> None:
        """Release the onnxruntime session (and its weights). Callers must have drained requests."""
        with self._lock:
            self._session = None
            self._driver = None  # type: ignore[assignment]
        self.adapters.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- the model call

    def new_state(self, capacity: int | None = None, adapter: str | Adapter | None = None) -> RunState:
        """A fresh KV cache; ``capacity`` (tokens) lets graphs with preallocated buffers size them. ``adapter``
        (a resident adapter's name, or an Adapter) fills the graph's LoRA slots for this state's whole life."""
        chosen = self._adapter(adapter)
        if chosen is None:
            return self._live_driver().new_state(capacity)
        return self._live_driver().new_state(capacity, chosen.params)

    def forward(self, state: RunState, token_ids: Sequence[int] | np.ndarray, last_only: bool = False) -> np.ndarray:
        """Feed ``token_ids`` [n] after what ``state`` holds; returns logits [n, vocab], or with
        ``last_only`` the last row's [1, vocab] (graphs that can skip the LM head for the others do)."""
        ids = np.asarray(token_ids, dtype=np.int64)  # [n]
        if state.n_past + ids.shape[0] > self.context_length:
            raise ContextWindowError(
                f"{state.n_past + ids.shape[0]} tokens exceed the context window of {self.context_length}"
            )
        return self._live_driver().forward(state, ids, last_only)

    def prefill(self, state: RunState, token_ids: np.ndarray) -> np.ndarray:
        """Feed a prompt in chunks of ``options.prefill_chunk``; returns the last logits [vocab]."""
        chunk = self.options.prefill_chunk
        last: np.ndarray | None = None
        for start in range(0, token_ids.shape[0], chunk):
            last = self.forward(state, token_ids[start : start + chunk], last_only=True)[-1]  # [vocab]
        assert last is not None
        return last

    # ---------------------------------------------------------------- public operations

    def perplexity(self, token_ids: Sequence[int], adapter: str | Adapter | None = None) -> float:
        """exp(mean NLL) of each token given those before it. Texts longer than the context window are
        scored in independent windows of ``context_length`` tokens (each window's first token is not
        predicted)."""
        nll_sum, count = 0.0, 0
        for tgt, logp in self.log_probs(token_ids, adapter):
            nll_sum -= float(logp[np.arange(tgt.shape[0]), tgt].astype(np.float64).sum())
            count += int(tgt.shape[0])
        return math.exp(nll_sum / count)

    def log_probs(
        self, token_ids: Sequence[int], adapter: str | Adapter | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Teacher-forced next-token log-probabilities over a text, chunk by chunk: (targets [c], log-softmax
        [c, vocab] float32) where row j is the distribution after the text up to targets[j]. Windows as
        ``perplexity`` (which is built on it); the quality gate compares these rows between two models."""
        ids = self._check_ids(token_ids)
        if ids.shape[0] < 2:
            raise InvalidParamsError("perplexity needs at least 2 tokens")
        chunk = self.options.prefill_chunk
        chosen = self._adapter(adapter)
        for w0 in range(0, ids.shape[0], self.context_length):
            window = ids[w0 : w0 + self.context_length]  # [w]
            if window.shape[0] < 2:
                break
            state = self.new_state(window.shape[0], chosen)
            for start in range(0, window.shape[0] - 1, chunk):
                inp = window[start : min(start + chunk, window.shape[0] - 1)]  # [c]; the last token is only a target
                tgt = window[start + 1 : start + 1 + inp.shape[0]]  # [c]
                logits = self.forward(state, inp).astype(np.float64)  # [c, vocab]
                mx = logits.max(axis=-1, keepdims=True)
                lse = np.log(np.exp(logits - mx).sum(axis=-1, keepdims=True)) + mx  # [c, 1]
                yield tgt, (logits - lse).astype(np.float32)

    def greedy(
        self, prompt_ids: Sequence[int], max_new_tokens: int, adapter: str | Adapter | None = None
    ) -> list[int]:
        """Exactly ``max_new_tokens`` argmax tokens (no EOS stop), for golden and agreement checks."""
        return self.greedy_with_margins(prompt_ids, max_new_tokens, adapter)[0]

    def greedy_with_margins(
        self, prompt_ids: Sequence[int], max_new_tokens: int, adapter: str | Adapter | None = None
    ) -> tuple[list[int], list[float]]:
        """``greedy`` plus, per token, the logit gap between the chosen token and the runner-up. A small gap
        is a near-tie that another CPU's kernels may break the other way; the export keeps such tokens
        out of the signed golden check."""
        if max_new_tokens < 0:
            raise InvalidParamsError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        prompt = self._check_prompt(prompt_ids, max_new_tokens, strict=True)
        out: list[int] = []
        margins: list[float] = []
        if max_new_tokens == 0:
            return out, margins
        state = self.new_state(prompt.shape[0] + max_new_tokens, adapter)
        logits = self.prefill(state, prompt)  # [vocab]
        while True:
            top2 = np.partition(logits, -2)[-2:]  # [2]: runner-up, best
            out.append(int(np.argmax(logits)))
            margins.append(float(top2[1] - top2[0]))
            if len(out) == max_new_tokens:
                return out, margins
            logits = self.forward(state, [out[-1]])[0]

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        constraint: Constraint | None = None,
        logprobs: int | None = None,
        adapter: str | Adapter | None = None,
    ) -> TokenStream:
        """Stream sampled token ids. Raises ContextWindowError now (not on first next()) when the prompt
        does not fit; generation past the window ends with finish_reason "length". ``constraint`` masks
        each step's logits (constraints.GrammarConstraint) and ends the generation when it is complete;
        ``logprobs`` (top-N, 0 for the chosen token only) fills ``TokenStream.last_logprob``; ``adapter`` (a
        resident adapter's name, or an Adapter) is resolved now and used for the whole stream."""
        params = params or SamplingParams()
        prompt = self._check_prompt(prompt_ids, 1 if params.max_new_tokens else 0, strict=False)
        self._live_driver()
        return TokenStream(self, prompt, params, constraint, logprobs, self._adapter(adapter))

    def _generate_loop(
        self,
        prompt: np.ndarray,
        params: SamplingParams,
        stream: TokenStream,
        constraint: Constraint | None,
        logprobs: int | None,
        adapter: Adapter | None = None,
    ) -> Iterator[int]:
        if params.max_new_tokens == 0:
            stream.finish_reason = "length"
            return
        stops = frozenset(params.stop_token_ids) if params.stop_token_ids is not None else self.stop_token_ids
        sampler = Sampler(params)
        use_history = params.repetition_penalty != 1.0
        history = list(prompt.tolist()) if use_history else []
        state = self.new_state(min(prompt.shape[0] + params.max_new_tokens, self.context_length), adapter)
        logits = self.prefill(state, prompt)  # [vocab]
        while True:
            masked = constraint.mask(logits) if constraint is not None else logits  # [vocab]
            tok = sampler(masked, np.asarray(history, dtype=np.int64) if use_history else None)
            if logprobs is not None:
                stream.last_logprob = token_logprob(logits, tok, logprobs)
            stream.generated.append(tok)
            more = constraint.advance(tok) if constraint is not None else True
            is_stop = (not params.ignore_eos) and tok in stops
            if is_stop:
                stream.finish_reason = "stop"
                return  # the stop token is not yielded
            yield tok
            if not more:  # the grammar is complete: only EOS could follow
                stream.finish_reason = "stop"
                return
            if use_history:
                history.append(tok)
            # n_past + 1 = prompt + generated: the sequence fills the window, the last token needs no feed
            if len(stream.generated) >= params.max_new_tokens or state.n_past + 1 >= self.context_length:
                stream.finish_reason = "length"
                return
            logits = self.forward(state, [tok])[0]

    # ---------------------------------------------------------------- text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok().encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok().decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> ChatTemplate | None:
        return self._chat

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        if self._chat is None:
            raise InvalidParamsError("this model has no chat template; use a plain completion")
        return self._chat.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        # The template writes the special tokens itself, so the tokenizer must not add more.
        return self.encode(self.render_chat(messages, tools=tools), add_special_tokens=False)

    def stream_text(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        constraint: Constraint | None = None,
        logprobs: int | None = None,
        adapter: str | Adapter | None = None,
    ) -> Iterator[TextEvent]:
        """Text deltas of a generation, with ``params.stop`` text sequences applied. The last event carries
        the finish reason. Closing this generator cancels the generation. ``constraint``, ``logprobs`` and
        ``adapter`` as in ``generate`` (each token's event carries its logprob)."""
        tokens = self.generate(prompt_ids, params, constraint, logprobs, adapter)
        decoder = IncrementalDecoder(self._tok())
        matcher = StopMatcher(params.stop)
        try:
            for tok in tokens:
                text, stopped = matcher.feed(decoder.push(tok))
                if stopped:
                    yield TextEvent(text, tok, "stop", tokens.last_logprob)
                    return
                yield TextEvent(text, tok, None, tokens.last_logprob)
            tail, stopped = matcher.feed(decoder.flush())
            if not stopped:
                tail += matcher.flush()
            yield TextEvent(tail, None, "stop" if stopped else (tokens.finish_reason or "stop"))
        finally:
            tokens.close()

    def complete(
        self, prompt_ids: Sequence[int], params: SamplingParams, adapter: str | Adapter | None = None
    ) -> Completion:
        parts: list[str] = []
        ids: list[int] = []
        reason = "stop"
        for ev in self.stream_text(prompt_ids, params, adapter=adapter):
            parts.append(ev.text)
            if ev.token_id is not None:
                ids.append(ev.token_id)
            if ev.finish_reason:
                reason = ev.finish_reason
        return Completion("".join(parts), ids, len(prompt_ids), reason)

    # ---------------------------------------------------------------- helpers

    def _live_driver(self):  # noqa: ANN202
        driver = self._driver
        if driver is None:
            raise EngineClosedError("engine was closed")
        return driver

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise NoTokenizerError("engine was loaded without a tokenizer")
        return self.tokenizer

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None or self.tokenizer is None:
            return ""
        return self.tokenizer.id_to_token(token_id) or ""

    def _eos_text(self) -> str:
        return self._token_text(self.arch.eos_token_ids[0]) if self.arch.eos_token_ids else ""

    def _check_ids(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(list(token_ids), dtype=np.int64)  # [n]
        if ids.ndim != 1:
            raise InvalidParamsError("token ids must be a flat sequence of ints")
        if ids.size and (ids.min() < 0 or ids.max() >= self.arch.vocab_size):
            raise InvalidParamsError(f"token ids must be in [0, {self.arch.vocab_size})")
        return ids

    def _check_prompt(self, prompt_ids: Sequence[int], room: int, strict: bool) -> np.ndarray:
        ids = self._check_ids(prompt_ids)
        if ids.shape[0] == 0:
            raise InvalidParamsError("the prompt is empty")
        need = ids.shape[0] + (room if strict else min(room, 1))
        if need > self.context_length:
            raise ContextWindowError(
                f"the prompt has {ids.shape[0]} tokens"
                + (f" and {room} new tokens were asked" if strict and room else "")
                + f"; the context window is {self.context_length} tokens"
            )
        return ids


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise BundleLoadError(f"cannot load tokenizer {path}: {exc}") from exc


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BundleLoadError(f"cannot read {path}: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleLoadError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}
