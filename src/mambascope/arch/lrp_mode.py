"""LRP mode of the traced forward: layer-wise relevance propagation as gradient × input of a modified
forward (MambaLRP, Jafari et al. 2024; AttnLRP, Achtibat et al. 2024; docs/methods.md "MambaLRP").

The forward values are unchanged, but the factors that would break conservation are held constant
(detached), so that every piece's modified Jacobian J̃ satisfies J̃·x = output (Euler's relation of a
degree-1 homogeneous map), and relevance = embedding gradient × embedding.  The block code of the
adapters (``arch/parts.py`` and the families' ``run_block``) calls the primitives below, which consult
the rules of the current :func:`lrp_mode` and are the plain operations outside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LRPRules", "activation", "held", "lrp_mode", "lrp_rules", "normalize", "product", "silu"]



@dataclass(frozen=True)
class LRPRules:
    """Which relevance rules the forward applies; each flag switches one rule (all on: MambaLRP + AttnLRP).

    ``act``: an elementwise activation f as x·(f(x)/x) with the ratio held constant (SiLU = x·σ(x), σ
    constant; the identity rule).  ``ssm``: the scans linear in their input u, with Δ, B, C (hence Ā, B̄)
    held constant.  ``gate``: half-propagation through a product of two input-dependent factors
    (y·SiLU(z), act(gate)·up, A·v, q·k).  ``norm``: RMSNorm / LayerNorm with the normaliser held constant.
    ``attention``: ``"cp"`` the softmax pattern held constant (CP-LRP, the default of ``lxt`` for GPT-2),
    ``"attnlrp"`` the softmax's own gradient with the uniform rule on q·kᵀ and pattern·v (AttnLRP),
    ``"gradient"`` no attention rule.
    """

    act: bool = True
    ssm: bool = True
    gate: bool = True
    norm: bool = True
    attention: str = "cp"

    def __post_init__(self) -> None:
        if self.attention not in ("cp", "attnlrp", "gradient"):
            raise ValueError(f"unknown attention rule {self.attention!r}; valid: 'cp', 'attnlrp', 'gradient'")


_RULES: ContextVar[LRPRules | None] = ContextVar("mambascope_lrp_rules", default=None)


@contextlib.contextmanager
def lrp_mode(rules: LRPRules) -> Iterator[None]:
    """Run the forwards inside the block with the relevance rules ``rules`` (thread- and task-local)."""
    token = _RULES.set(rules)
    try:
        yield
    finally:
        _RULES.reset(token)


def lrp_rules() -> LRPRules | None:
    """The rules in force (None outside :func:`lrp_mode`)."""
    return _RULES.get()


def _rule(name: str) -> bool:
    rules = _RULES.get()
    if rules is None:
        return False
    if name == "attnlrp":
        return rules.attention == "attnlrp"
    return bool(getattr(rules, name))



def held(t: torch.Tensor, rule: str) -> torch.Tensor:
    """t held constant (detached) when LRP rule ``rule`` is in force, else t itself."""
    return t.detach() if _rule(rule) else t


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU(x) = x·σ(x); in LRP mode (``act``) with σ(x) held constant."""
    return x * torch.sigmoid(x).detach() if _rule("act") else F.silu(x)


def activation(act: Callable, x: torch.Tensor) -> torch.Tensor:
    """act(x); in LRP mode (``act``) x·(act(x)/x) with the ratio held constant (the identity rule; at
    x = 0 the ratio is taken as 0, where x contributes nothing)."""
    out = act(x)
    return x * _ratio(out, x).detach() if _rule("act") else out


def product(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor,
            b: torch.Tensor, rule: str = "gate") -> torch.Tensor:
    """op(a, b) for a bilinear op; in LRP mode half-propagation: ½·op(a, b̂) + ½·op(â, b) (â, b̂ held
    constant), so each factor receives half the relevance.  Equal in value to op(a, b) (0.5·v + 0.5·v = v
    in floating point).  A factor that does not depend on the input (no autograd history) is a weight,
    not an input: then the product is linear in the other factor and passes its gradient unchanged."""
    if not _rule(rule) or not (a.requires_grad and b.requires_grad):
        return op(a, b)
    return 0.5 * op(a, b.detach()) + 0.5 * op(a.detach(), b)


def normalize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a model's RMSNorm / LayerNorm module; in LRP mode (``norm``) with its normaliser
    held constant.  LayerNorm: (x − mean(x))·ŵ + bias with ŵ = weight / std(x) constant (the mean stays a
    linear map, as in ``lxt``).  An RMSNorm (a module with ``variance_epsilon``, as every Hugging Face
    RMSNorm has): the elementwise scale norm(x)/x held constant, which is exactly weight·rsqrt(mean x² + ε)
    with the rsqrt constant, whatever the weight's form.  Any other module is not a norm the rule knows and
    runs as it is."""
    if not _rule("norm"):
        return norm(x)
    if isinstance(norm, nn.LayerNorm):
        centred = x - x.mean(-1, keepdim=True)
        std = (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
        out = centred / std.detach()
        out = out if norm.weight is None else out * norm.weight
        return out if norm.bias is None else out + norm.bias
    out = norm(x)
    if not hasattr(norm, "variance_epsilon"):
        return out
    return x * _ratio(out, x).detach()


def _ratio(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out / x elementwise, 0 where x = 0 (there x contributes nothing, whatever the ratio)."""
    nonzero = x != 0
    return torch.where(nonzero, out / torch.where(nonzero, x, torch.ones_like(x)), torch.zeros_like(out))
