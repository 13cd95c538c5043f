"""Selective scans and exact hidden-attention kernels (pure PyTorch)."""

from mambascope.ssm.hidden_attention import (
    KINDS,
    REDUCTIONS,
    AttentionMemoryError,
    AttentionPlan,
    attention_plan,
    block_bias,
    hidden_attention,
    output_gate,
    s6_attention,
    ssd_attention,
)
from mambascope.ssm.scan import segment_sum, selective_scan, ssd_scan

__all__ = ["KINDS", "REDUCTIONS", "AttentionMemoryError", "AttentionPlan", "attention_plan", "block_bias",
           "hidden_attention", "output_gate", "s6_attention", "segment_sum", "selective_scan", "ssd_attention",
           "ssd_scan"]
