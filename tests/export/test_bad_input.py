"""Bad input: a clear named error, no partial output, no temporary files left behind."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.errors import OutOfSpaceError
from export.pipeline import WORK_PREFIX, ExportRequest, run_export
from export.sources import default_gguf
from manifests import SigningKey
from tests.export.conftest import REPO, run_cli

LOOSE = ["--max-ppl-increase", "1000", "--max-kl", "1000", "--min-top-match", "0"]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _fail(args: list[str], tmp_path: Path, env: dict | None = None) -> dict:
    proc = run_cli([*args, "--json"], env=env)
    assert proc.returncode == 1, (proc.stdout, proc.stderr[-2000:])
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False
    return doc


def test_missing_gguf(tmp_path: Path, session_key) -> None:
    doc = _fail(
        [
            "export",
            "--model",
            str(tmp_path / "nope.gguf"),
            "--key",
            str(session_key[0]),
            "--out",
            str(tmp_path / "out" / "b"),
        ],
        tmp_path,
    )
    assert doc["reason"] == "source_not_found" and "does not exist" in doc["error"]
    assert _leftovers(tmp_path) == []


def test_gguf_with_bad_magic(tmp_path: Path, session_key) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTAGGUF" + os.urandom(1000))
    out = tmp_path / "out"
    doc = _fail(
        ["export", "--model", str(bad), "--key", str(session_key[0]), "--out", str(out / "b")], tmp_path
    )
    assert doc["reason"] == "corrupt_source" and "not a GGUF file" in doc["error"]
    assert _leftovers(out) == []


def test_truncated_gguf(tmp_path: Path, session_key) -> None:
    cut = tmp_path / "cut.gguf"
    with open(default_gguf(), "rb") as fh:
        cut.write_bytes(fh.read(2_000_000))  # a real header, then nothing
    out = tmp_path / "out"
    doc = _fail(
        ["export", "--model", str(cut), "--key", str(session_key[0]), "--out", str(out / "b")], tmp_path
    )
    assert doc["reason"] == "corrupt_source" and "cut.gguf" in doc["error"]
    assert _leftovers(out) == []


def test_unknown_architecture(tmp_path: Path, session_key) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2-tiny"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(folder)
    out = tmp_path / "out"
    doc = _fail(
        ["export", "--model", str(folder), "--key", str(session_key[0]), "--out", str(out / "b")], tmp_path
    )
    assert doc["reason"] == "unsupported_architecture"
    assert "llama" in doc["error"] and "mistral" in doc["error"]
    assert _leftovers(out) == []


def test_bad_key_file(tmp_path: Path, micro_llama_dir: Path) -> None:
    key = tmp_path / "bad.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    out = tmp_path / "out"
    doc = _fail(
        ["export", "--model", str(micro_llama_dir), "--key", str(key), "--out", str(out / "b")], tmp_path
    )
    assert doc["reason"] == "key_format" and "bad.key" in doc["error"]
    assert _leftovers(out) == []


def test_hub_id_not_cached_while_offline(tmp_path: Path, session_key) -> None:
    doc = _fail(
        [
            "export",
            "--model",
            "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            "--key",
            str(session_key[0]),
            "--out",
            str(tmp_path / "out" / "b"),
        ],
        tmp_path,
        env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
    )
    assert doc["reason"] == "source_not_found"
    assert "not in the local Hugging Face cache" in doc["error"] and "HF_HUB_OFFLINE" in doc["error"]


def test_existing_output_is_not_overwritten(tmp_path: Path, session_key, micro_llama_dir: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep").write_text("x")
    doc = _fail(
        ["export", "--model", str(micro_llama_dir), "--key", str(session_key[0]), "--out", str(out)], tmp_path
    )
    assert doc["reason"] == "output_exists" and (out / "keep").read_text() == "x"


def test_micro_export_then_force_replaces(tmp_path: Path, session_key, micro_llama_dir: Path) -> None:
    out = tmp_path / "b"
    for _ in range(2):
        proc = run_cli(
            [
                "export",
                "--model",
                str(micro_llama_dir),
                "--key",
                str(session_key[0]),
                "--out",
                str(out),
                "--json",
                "--force",
                *LOOSE,
            ]
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    ok = run_cli(["bundle", "verify", str(out), "--pubkey", str(session_key[1])])
    assert ok.returncode == 0, ok.stderr
    assert _leftovers(tmp_path) == ["b"]


def test_ctrl_c_during_export_leaves_nothing(tmp_path: Path, session_key, micro_llama_dir: Path) -> None:
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanofleet.cli",
            "export",
            "--model",
            str(micro_llama_dir),
            "--key",
            str(session_key[0]),
            "--out",
            str(out_parent / "b"),
            "--json",
            *LOOSE,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        # A job started in the background of a non-interactive shell inherits SIGINT ignored, and so
        # would the export: give it the default disposition a terminal's Ctrl-C meets.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    # Interrupt once the export has begun writing into the work folder (its assets come first).
    while time.monotonic() < deadline and proc.poll() is None:
        work = [p for p in out_parent.iterdir() if p.name.startswith(WORK_PREFIX)]
        if work and (work[0] / "assets").exists():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "export finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert json.loads(stdout)["reason"] == "interrupted"
    assert _leftovers(out_parent) == []


@pytest.mark.parametrize("builder", ["direct", "traced"])
def test_no_space_left_is_named_and_cleaned_up(
    tmp_path: Path, micro_llama_dir: Path, monkeypatch, builder: str
) -> None:
    """ENOSPC in the middle of writing (injected at the weights' write: a real full disk can't be made here
    without root) → OutOfSpaceError, nothing left behind."""
    import export.direct as direct
    import export.pipeline as pipeline

    def full_disk(src: Path, out_dir: Path, recipe):  # noqa: ANN001, ANN202
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model.onnx").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "model.onnx"))

    real_tensor = direct.ExternalData.tensor

    def full_after_a_few(self, name, array):  # noqa: ANN001, ANN202
        if self.bytes_written > 50_000:  # some weights are on disk already
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_tensor(self, name, array)

    monkeypatch.setattr(pipeline, "quantize", full_disk)
    monkeypatch.setattr(direct.ExternalData, "tensor", full_after_a_few)
    out = tmp_path / "out"
    with pytest.raises(OutOfSpaceError) as err:
        run_export(
            ExportRequest(model=str(micro_llama_dir), key=SigningKey.generate(), out=out / "b", builder=builder)
        )
    assert "no space left" in err.value.message
    assert _leftovers(out) == []


def test_preflight_space_check(tmp_path: Path, micro_llama_dir: Path, monkeypatch) -> None:
    import shutil as real_shutil

    import export.pipeline as pipeline

    real_disk_usage = real_shutil.disk_usage

    def tiny_disk(path):  # noqa: ANN001, ANN202
        return real_disk_usage(path)._replace(free=1000)

    monkeypatch.setattr(pipeline.shutil, "disk_usage", tiny_disk)
    out = tmp_path / "out"
    with pytest.raises(OutOfSpaceError) as err:
        run_export(ExportRequest(model=str(micro_llama_dir), key=SigningKey.generate(), out=out / "b"))
    assert "needs about" in err.value.message
    assert _leftovers(out) == []


def test_without_key_the_default_key_is_created_and_announced(tmp_path: Path, micro_llama_dir: Path) -> None:
    cfg = tmp_path / "config"
    out = tmp_path / "b"
    proc = run_cli(
        ["export", "--model", str(micro_llama_dir), "--out", str(out), *LOOSE],
        env={"XDG_CONFIG_HOME": str(cfg)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    priv, pub = cfg / "nanofleet" / "keys" / "nanofleet.key", cfg / "nanofleet" / "keys" / "nanofleet.pub"
    assert "created a signing key" in proc.stderr and str(priv) in proc.stderr.replace("\n", "")
    assert priv.stat().st_mode & 0o777 == 0o600
    assert run_cli(["bundle", "verify", str(out), "--pubkey", str(pub)]).returncode == 0
