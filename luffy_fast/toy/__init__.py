"""The embedded default: digit reversal with a tiny Qwen2, for `luffy-fast demo`."""
