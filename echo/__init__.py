"""ECHO: interactive head generation (core library).

Public names are imported lazily so that `import echo` stays light (no diffusers/transformers import until used).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0.dev0"

_LAZY = {
    "EchoTransformer3DModel": "echo.transformer_echo",
    "EchoTransformerOutput": "echo.transformer_echo",
    "LongRangeContextEncoder": "echo.lcu",
    "LCUOutput": "echo.lcu",
    "MambaBlock": "echo.mamba",
    "OmniUnderstanding": "echo.understanding",
    "EmotionReasoner": "echo.emotion",
    "EmotionTextEncoder": "echo.emotion",
    "ConversationDataset": "echo.data",
    "collate_conversations": "echo.data",
    "flow_matching": "echo.flow_matching",
    "masks": "echo.masks",
    "audio": "echo.audio",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'echo' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value
