"""LoRA adapters on the build side: a PEFT folder + a base bundle → a signed, quality-gated adapter bundle.

    from export.adapters import AdapterRequest, run_export_adapter
    result = run_export_adapter(AdapterRequest(base=Path("bundle"), adapter=Path("my-lora"), key=key))

``nanofleet export-adapter`` (cli.py) is the command; docs/engine.md ("LoRA adapters") the design.
"""

from .build import AdapterRequest, AdapterResult, BaseBundleError, run_export_adapter
from .pack import PackedAdapter, pack, write_adapter_file
from .peft_dir import AdapterSourceError, ModuleLora, PeftAdapter, read_peft

__all__ = [
    "AdapterRequest",
    "AdapterResult",
    "AdapterSourceError",
    "BaseBundleError",
    "ModuleLora",
    "PackedAdapter",
    "PeftAdapter",
    "pack",
    "read_peft",
    "run_export_adapter",
    "write_adapter_file",
]
