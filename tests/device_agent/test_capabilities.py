"""Board capabilities: /proc parsing on real-looking boards, the injected probe, and the agent reporting
them in its reported state, its telemetry and its enrolment request."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from device.agent import Agent
from device.agent.capabilities import StaticProbe, SystemProbe, parse_cpuinfo, parse_meminfo, probe_safely
from device.agent.config import load_config
from manifests import BoardCapabilities
from manifests.mqtt import ReportedState, Telemetry

from .fake_link import FakeLink
from .fake_runtime import FakeRuntime

PI5_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b

processor\t: 1
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp

Revision\t: d04170
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""
X86_CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 AVX2 avx512_vnni\n"
MEMINFO = "MemTotal:        8245632 kB\nMemFree:         7000000 kB\n"


def test_cpuinfo_and_meminfo_parsing() -> None:
    model, features = parse_cpuinfo(PI5_CPUINFO)
    assert model == "Raspberry Pi 5 Model B Rev 1.0"
    assert features is not None and "asimddp" in features and "i8mm" not in features and features == sorted(features)
    assert parse_cpuinfo(X86_CPUINFO) == ("AMD EPYC 7B13", ["avx2", "avx512_vnni", "fpu", "sse2"])
    assert parse_cpuinfo("processor : 0\n") == (None, None)  # features not said: not reported, not "none"
    assert parse_meminfo(MEMINFO) == 8245632 * 1024
    assert parse_meminfo("MemFree: 1 kB\n") is None


def test_system_probe_reads_proc_and_the_runtime(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(PI5_CPUINFO)
    (tmp_path / "meminfo").write_text(MEMINFO)
    fake_ort = ("1.22.0", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    caps = SystemProbe("pi5", proc=tmp_path, runtime_info=lambda: fake_ort).probe()
    assert caps.hardware_class == "pi5" and caps.ram_bytes == 8245632 * 1024
    assert caps.execution_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert caps.onnxruntime_version == "1.22.0" and "asimddp" in (caps.cpu_features or [])
    # A board whose /proc cannot be read reports what it can, and a probe that raises stops nothing.
    bare = SystemProbe(proc=tmp_path / "nope", runtime_info=lambda: (None, None)).probe()
    assert bare.ram_bytes is None and bare.cpu_features is None and bare.arch

    class Broken:
        def probe(self) -> BoardCapabilities:
            raise OSError("no /proc")

    assert probe_safely(Broken()) is None


def test_this_host_really_reports_its_onnxruntime() -> None:
    import onnxruntime as ort

    caps = SystemProbe().probe()
    assert caps.onnxruntime_version == ort.__version__
    assert "CPUExecutionProvider" in (caps.execution_providers or [])
    assert caps.ram_bytes and caps.ram_bytes > 2**28 and caps.cpu_features


def test_agent_reports_capabilities_in_reported_state_and_first_telemetry(tmp_path: Path, keypair) -> None:
    _key, _priv, pub = keypair
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device_id": "caps-dev",
                "hardware_class": "pi5",
                "mqtt": {"url": "mqtt://127.0.0.1:1"},
                "artifacts": {"base_url": "http://127.0.0.1:1/"},
                "trusted_keys": [str(pub)],
                "data_dir": str(tmp_path / "data"),
            }
        )
    )
    caps = BoardCapabilities(
        arch="aarch64", hardware_class="pi5", ram_bytes=8 << 30, cpu_features=["asimd", "asimddp"],
        onnxruntime_version="1.22.0", execution_providers=["CPUExecutionProvider"],
    )
    a = Agent(load_config(config), runtime=FakeRuntime(), link=FakeLink, capabilities=StaticProbe(caps))
    try:
        rep = ReportedState.from_bytes(a.reported().to_bytes())
        assert rep.capabilities == caps
        first = Telemetry.from_bytes(a.sampler.sample(1, {}, None, 0, a.capabilities).to_bytes())
        second = Telemetry.from_bytes(a.sampler.sample(2, {}, None, 0, a.capabilities).to_bytes())
        assert first.capabilities == caps and second.capabilities is None
        assert json.loads(a.reported().to_bytes())["capabilities"]["schema"] == "nanofleet.capabilities/1"
    finally:
        a.outbox.close()
