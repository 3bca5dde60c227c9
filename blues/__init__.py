"""Blues: Mixture-of-Experts language models trained with DeepSpeed.

    from blues import Blues, BluesConfig, get_preset, load_config, default_tokenizer

`generate` is a method (model.generate) and the module blues.generate: it is not re-exported here, where
the submodule's name would shadow it.

The names are imported on first use (PEP 562), so `import blues.common` or a CLI's --help does not
pay for torch, Triton and DeepSpeed.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Blues": "blues.model",
    "BluesOutput": "blues.model",
    "BluesConfig": "blues.config",
    "ModelConfig": "blues.config",
    "MoEConfig": "blues.config",
    "TrainConfig": "blues.config",
    "get_preset": "blues.presets",
    "load_config": "blues.presets",
    "PRESETS": "blues.presets",
    "Tokenizer": "blues.data.tokenizer",
    "default_tokenizer": "blues.data.tokenizer",
    "MoE": "blues.moe",
    "forced_routing": "blues.moe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'blues' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
