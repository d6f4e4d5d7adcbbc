"""luffy-fast: a fused LUFFY loss op and a LUFFY trainer."""

from .advantages import group_advantages
from .config import LuffyLossConfig
from .ops import fused_luffy_loss, token_logprobs

__all__ = ["fused_luffy_loss", "token_logprobs", "LuffyLossConfig", "group_advantages"]
__version__ = "0.1.0"
