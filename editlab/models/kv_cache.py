"""The name under which a model's forward takes and returns its KV cache.

transformers 5 calls it ``cache``; ``past_key_values``, the 4.x name that editlab still supports,
is deprecated there and warns at every call (the argument as a FutureWarning, the output
attribute as a log line).  Model outputs carry the cache under the same name as the argument.
"""
from __future__ import annotations

import inspect

from torch import nn


def cache_keyword(model: nn.Module) -> str:
    """``"cache"`` where ``model.forward`` takes it, else ``"past_key_values"``: pass the cache as
    ``model(..., **{name: cache})`` and read it back as ``getattr(output, name)``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
