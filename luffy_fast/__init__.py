"""luffy-fast: a fused LUFFY loss op and a LUFFY trainer."""

from .advantages import group_advantages
from .config import LuffyLossConfig
from .ops import fused_luffy_loss, token_logprobs

# The trainer-side layer, imported on first use: it pulls in transformers (via the rollout engines)
_LAZY = {"FusedLossHead": "luffy_fast.policy", "PolicyWithFusedLoss": "luffy_fast.policy",
         "Task": "luffy_fast.tasks"}

__all__ = ["fused_luffy_loss", "token_logprobs", "LuffyLossConfig", "group_advantages", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'luffy_fast' has no attribute {name!r}")
__version__ = "0.1.0"
