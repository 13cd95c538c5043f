"""A hand-wired Mamba-1 recall model: a real ``MambaForCausalLM`` whose weights are set analytically, so that
the source of every MQAR prediction is known by construction (issue 19, item 4).  A model builder of the
package (docs/models.md), so that the attribution leaderboard scores it beside the bundled task models
(``mambascope leaderboard --models handwired-mamba-mqar``) and ``python -m mambascope.models.handwired OUT``
saves it for any subcommand.

Vocabulary: the task tokenizer's (:func:`mambascope.data.tasks.task_vocab`, V = 35): BOS, filler, ``|``,
keys k_0…k_15 (ids 3…18), values v_0…v_15 (ids 19…34).  Shape: one layer, d_model H = 48, expand 1
(d_inner 48), d_state N = 16 (one state slot per key), dt_rank 1, conv kernel 4.

Derivation, one module at a time, for the token x_t at position t (e_i the i-th unit vector):

1. **Embedding** (tied with the LM head): E[i] = e_i.  Layer 0's input is the embedding, so the RMSNorm
   (weight 1) gives x̂_t = ν·e_{x_t} with ν = (1/H + ε)^(-1/2) ≈ √48 (the norm of a one-hot is known).
2. **in_proj** splits d_inner into three groups of 16 channels and the gate:
   - V_j (channel j): reads e_{v_j}: the current token is value j;
   - K_n (channel 16+n): reads e_{k_n}: the current token is key n;
   - P_n (channel 32+n): reads e_{k_n} too, but its **conv** tap is at lag 1 (below): the previous token is key n;
   - gate z of the V channels: Σ_i x̂_t[i] = ν for every token (a one-hot), so SiLU(z) = SiLU(ν) =: c > 0 is a
     constant gate; the gate of every other channel is SiLU(0) = 0, so only the V channels write.
3. **conv1d** (depthwise, causal, bias 0): V and K channels are the identity at lag 0 (tap K−1), P channels
   at lag 1 (tap K−2).  After SiLU every channel is either c (its token condition holds) or exactly 0
   (SiLU(0) = 0, and the conv of zeros is zero).  So u_t[V_j] = c·[x_t = v_j], [K_n] = c·[x_t = k_n],
   [P_n] = c·[x_{t−1} = k_n].
4. **x_proj → Δ, B, C** (divided by c so each is 0 or 1):
   - B_t[n] = [x_{t−1} = k_n]: the position right after key n (in MQAR: that key's value) addresses slot n;
   - C_t[n] = [x_t = k_n]: a key reads slot n;
   - the dt rank-1 input τ_t = Σ_n [x_{t−1} = k_n] (1 right after a key, the *trigger*, else 0).
5. **dt_proj + softplus**: V channels have weight w and bias −b with softplus(w − b) = 1 (b = 20), so
   Δ_t = 1 right after a key and softplus(−20) ≈ 2·10⁻⁹ elsewhere: the Δ of the writing channels opens
   only on the token that follows a trigger.  Every other channel has weight 0: Δ ≈ 2·10⁻⁹ everywhere.
6. **A, D**: A = −exp(A_log) with A_log = −20 (A ≈ −2·10⁻⁹): over 64 positions of Δ ≤ 1 the decay
   exp(A·ΣΔ) is 1 to fp32 rounding, so a written slot is never forgotten.  D = 0: no skip path.

The scan: h_t[d, n] = exp(Δ_t[d]·A)·h_{t−1}[d, n] + Δ_t[d]·B_t[n]·u_t[d], y_t[d] = Σ_n C_t[n]·h_t[d, n].  Its
hidden attention (Ali et al. 2024) α_d[q, s] = Σ_n C_q[n]·exp(A·Σ_{s<k≤q}Δ_k[d])·B_s[n]·Δ_s[d] is nonzero only
where B_s·C_q ≠ 0, i.e. where x_{s−1} = x_q.  On an MQAR sequence queried at key k (position q, x_q = k):
keys are distinct in the pairs, every key is queried once, and the token before a query is filler or a
value, so for s < q the only such s is the value position of k's pair, s* = key_pos + 1; α_d[q, s*] =
Δ_{s*}[d] (1 on the V channels), and α_d[q, s] = 0 exactly for every other s ≤ q (B_s = 0 or C_q·B_s = 0).
Then y_q[V_j] = Σ_s α[q, s]·u_s[V_j] = c·[x_{s*} = v_j]: the state returns the value that followed the key.

7. **out_proj**: V_j writes c·y into residual coordinate e_{v_j}.  At the query the residual is
   r = e_k + c²·e_{v} (v the answer), every other coordinate 0; the final RMSNorm rescales it and the tied head
   reads coordinate i as logit i, so logit(v) : logit(k) = c² : 1 ≈ 48 : 1 and every other logit is 0.
   The greedy prediction at every query is the answer, exactly (no approximation beyond fp32 rounding).

Consequences the tests rely on (``tests/test_handwired.py``):

- the source of each prediction is the value position s* (changing the token there changes the prediction
  to the new value; changing any other context token except the key changes nothing);
- ``attention_weighted`` (mean_d |α_d[q, ·]|), ``rollout`` (one layer: ½·row-normalised Ā[q] + ½·e_q, ranked
  on 0..q−1), ``gradient_guided`` (g[q, d]·u[s, d]·α_d[q, s]: u[s*, ·] ≠ 0 only on the answer's channel V_v,
  where g = ∂log p(v)/∂y_q[V_v] > 0 because the RMSNorm'd residual's logit of v rises with its v coordinate)
  and ``block`` (M_d[q, j] = g_q[d]·α_d[q, s]·σ(conv)·Conv: the V channels' lag-0 conv keeps it at s*, other
  channels have gate 0) all give the context positions relevance 0 except s*, so each ranks the value
  first in every query: value hit@1 = MRR = 1 by construction;
- the key position s* − 1 has relevance exactly 0 under all of them (the key enters through the conv's lag-1
  tap into Δ and B at s*, which the hidden attention does not attribute to s* − 1), and ``gradient_x_post``
  at one layer sees only the query position (post[t] for t < q reaches no later position), so their key
  rows and ``gradient_x_post``'s rows are whatever the random tie-break gives: reported, not asserted.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from mambascope.data.tasks import NUM_KEYS, NUM_VALUES, task_tokenizer, task_vocab

HIDDEN = 48  # >= the 35 task tokens: every token has its own coordinate
STATE = NUM_KEYS  # one state slot per key
CONV = 4
DT_CLOSED_BIAS = -20.0  # softplus(-20) ≈ 2e-9: a closed Δ
A_LOG = -20.0  # A ≈ -2e-9: no forgetting over a few hundred positions
KEY0, VALUE0 = 3, 3 + NUM_KEYS
V_CH, K_CH, P_CH = 0, NUM_VALUES, NUM_VALUES + NUM_KEYS  # first channel of each group

NAME = "handwired-mamba-mqar"  # its name where a command takes a model name (`mambascope leaderboard --models`)
TASK = {"task": "mqar", "seq_len": 64, "num_pairs": 8, "seed": 0}  # the task it is scored on (as training.json)

__all__ = ["NAME", "TASK", "handwired_mamba_recall", "save_handwired"]


def handwired_mamba_recall():
    """The model of the module docstring (``MambaForCausalLM``, fp32, eval mode)."""
    from transformers import MambaConfig, MambaForCausalLM

    vocab = len(task_vocab())
    config = MambaConfig(vocab_size=vocab, hidden_size=HIDDEN, state_size=STATE, num_hidden_layers=1, expand=1,
                         conv_kernel=CONV, time_step_rank=1, use_bias=False, use_conv_bias=True,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = MambaForCausalLM(config).eval()
    eps = config.layer_norm_epsilon
    nu = (1.0 / HIDDEN + eps) ** -0.5  # RMSNorm of a one-hot embedding
    c = nu / (1.0 + math.exp(-nu))  # SiLU(nu): the "on" level of a channel and the V gate
    mixer = model.backbone.layers[0].mixer
    E = torch.zeros(vocab, HIDDEN)
    E[torch.arange(vocab), torch.arange(vocab)] = 1.0
    in_proj = torch.zeros(2 * HIDDEN, HIDDEN)
    conv = torch.zeros(HIDDEN, 1, CONV)
    x_proj = torch.zeros(1 + 2 * STATE, HIDDEN)
    out_proj = torch.zeros(HIDDEN, HIDDEN)
    for j in range(NUM_VALUES):
        in_proj[V_CH + j, VALUE0 + j] = 1.0
        in_proj[HIDDEN + V_CH + j, :vocab] = 1.0  # gate z = ν for every token
        conv[V_CH + j, 0, CONV - 1] = 1.0
        out_proj[VALUE0 + j, V_CH + j] = 1.0
    for n in range(NUM_KEYS):
        in_proj[K_CH + n, KEY0 + n] = 1.0
        in_proj[P_CH + n, KEY0 + n] = 1.0
        conv[K_CH + n, 0, CONV - 1] = 1.0  # lag 0: the current token
        conv[P_CH + n, 0, CONV - 2] = 1.0  # lag 1: the previous token
        x_proj[0, P_CH + n] = 1.0 / c  # τ: the previous token was a key
        x_proj[1 + n, P_CH + n] = 1.0 / c  # B
        x_proj[1 + STATE + n, K_CH + n] = 1.0 / c  # C
    dt_weight = torch.zeros(HIDDEN, 1)
    open_logit = math.log(math.e - 1.0)  # softplus(open_logit) = 1
    dt_weight[V_CH:V_CH + NUM_VALUES, 0] = open_logit - DT_CLOSED_BIAS
    with torch.no_grad():
        model.backbone.embeddings.weight.copy_(E)
        model.backbone.layers[0].norm.weight.fill_(1.0)
        model.backbone.norm_f.weight.fill_(1.0)
        mixer.in_proj.weight.copy_(in_proj)
        mixer.conv1d.weight.copy_(conv)
        mixer.conv1d.bias.zero_()
        mixer.x_proj.weight.copy_(x_proj)
        mixer.dt_proj.weight.copy_(dt_weight)
        mixer.dt_proj.bias.fill_(DT_CLOSED_BIAS)
        mixer.A_log.fill_(A_LOG)
        mixer.D.zero_()
        mixer.out_proj.weight.copy_(out_proj)
    if model.lm_head.weight.data_ptr() != model.backbone.embeddings.weight.data_ptr():
        raise RuntimeError("the LM head is not tied to the embedding: the construction needs logit i = coordinate i")
    return model


def save_handwired(out_dir: str | Path, *, seq_len: int = 64, num_pairs: int = 8, seed: int = 0) -> Path:
    """Save the model, the task tokenizer and a ``training.json`` naming its task, so that
    ``mambascope attention --model OUT --task mqar`` scores it like a trained task model.

    The record says ``construction`` (no training happened); ``task``, ``seq_len``, ``num_pairs`` and
    ``seed`` choose the held-out examples (seed·10⁶ − 1), as for a trained model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    handwired_mamba_recall().save_pretrained(out)
    task_tokenizer().save_pretrained(out)
    record = {"arch": "mamba", "model_class": "MambaForCausalLM", "task": "mqar", "seq_len": seq_len,
              "num_pairs": num_pairs, "seed": seed, "trained": False,
              "construction": "mambascope.models.handwired: weights set analytically (docstring), no training"}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":  # python -m mambascope.models.handwired OUT_DIR
    if len(sys.argv) != 2:
        sys.exit("usage: python -m mambascope.models.handwired OUT_DIR")
    print(save_handwired(sys.argv[1]))
