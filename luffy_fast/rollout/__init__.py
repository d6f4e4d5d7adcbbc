"""Rollout engines behind one interface (`RolloutEngine`)."""

from luffy_fast.rollout.base import Completion, RolloutEngine, SamplingParams
from luffy_fast.rollout.hf import HFGenerateEngine

__all__ = ["Completion", "HFGenerateEngine", "RolloutEngine", "SamplingParams"]
