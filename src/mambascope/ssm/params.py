"""The parameters of one Mamba mixer as plain tensors: what the scans and hidden-attention kernels need.

Filled from a model by the architecture adapters (``mambascope.arch``; only they know modules); defined here so
that ``ssm/`` stays math on tensors and never imports ``trace/`` or ``arch/`` (docs/design.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MixerParams:
    """Parameters of one Mamba mixer, as plain tensors (fp32 copies are made by the consumer).

    ``arch`` is the mixer's kind, ``"mamba"`` (Mamba-1 selective scan) or ``"mamba2"`` (SSD), whatever
    family the model is.  Mamba-1: ``A`` [E, N], ``D`` [E]. Mamba-2: ``A`` [H], ``D`` [H], channels e
    belong to head ``e // head_dim`` and to group ``e // (E // n_groups)``.
    ``conv_weight`` [E, K] and ``conv_bias`` [E] are the depthwise causal conv of the x channels only.
    ``out_proj_weight`` [d_model, E]. ``norm_weight`` [E] is Mamba-2's gated RMSNorm,
    normalising groups of ``d_inner // n_groups`` channels (None on Mamba-1, and on Mamba-2 mixers that
    gate y ⊙ SiLU(z) without a norm, as Falcon-H1 does by default).
    """

    arch: str
    A: torch.Tensor
    D: torch.Tensor
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    out_proj_weight: torch.Tensor
    d_inner: int
    d_state: int
    n_heads: int
    head_dim: int
    n_groups: int
    norm_weight: torch.Tensor | None = None
    norm_eps: float = 0.0
