"""Selective scans and hidden-attention kernels (pure PyTorch)."""

from mambascope.ssm.scan import segment_sum, selective_scan, ssd_scan

__all__ = ["segment_sum", "selective_scan", "ssd_scan"]
