"""Shared helpers for the Triton kernels: interpreter detection, tile configs, split counts."""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def tile_configs(role: str) -> list[triton.Config]:
    """Tile shapes to autotune over: a few for Hopper, one safe default elsewhere.

    Under the interpreter every tile is simulated on the CPU, so it gets small ones.
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_T": 16, "BLOCK_V": 32, "BLOCK_H": 16}, num_warps=4)]
    if hopper():
        return [
            triton.Config({"BLOCK_T": 128, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_T": 128, "BLOCK_V": 256, "BLOCK_H": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_T": 64, "BLOCK_V": 256, "BLOCK_H": 64}, num_warps=8, num_stages=4),
        ]
    return [triton.Config({"BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=4, num_stages=3)]


def shape_bucket(n: int) -> int:
    """Autotune key: round up to a power of two, so nearby shapes share one tuning."""
    return 1 << max(0, int(n) - 1).bit_length()


def num_vocab_splits(num_tokens: int, vocab_size: int) -> int:
    """Vocabulary splits for the forward grid, so that small token counts still fill the GPU."""
    if INTERPRET or not torch.cuda.is_available():
        return max(1, min(3, triton.cdiv(vocab_size, 64)))
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    token_tiles = triton.cdiv(max(num_tokens, 1), 128)
    return max(1, min(triton.cdiv(2 * sms, token_tiles), triton.cdiv(vocab_size, 2048)))
