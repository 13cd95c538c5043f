"""``mixer.hook_ssm_state``: the SSM state after chosen positions, read and edited (issue 12, item 1).

References: the loop recurrences of ``mambascope.ssm.reference`` (restarted from a given state), the model's
own forward with its out_proj input replaced by one recomputed from that loop, and the unsegmented trace.
"""

import pytest
import torch
import torch.nn.functional as F

from family_check import padded_batch, rel, stress
from mambascope.arch import adapter
from mambascope.ssm.reference import mamba1_scan, mamba2_scan
from mambascope.trace import trace
from test_arch_bamba import _model as bamba_model
from test_arch_falcon_h1 import CONFIGS as FALCON_H1_CONFIGS
from test_arch_falcon_h1 import _model as falcon_h1_model
from test_arch_falcon_mamba import CONFIGS as FALCON_MAMBA_CONFIGS
from test_arch_falcon_mamba import _model as falcon_mamba_model
from test_arch_granitemoehybrid import CONFIGS as GRANITE_CONFIGS
from test_arch_granitemoehybrid import _model as granite_model
from test_arch_jamba import _model as jamba_model
from test_arch_nemotron_h import CONFIGS as NEMOTRON_CONFIGS
from test_arch_nemotron_h import _model as nemotron_model
from test_arch_zamba2 import CONFIGS as ZAMBA2_CONFIGS
from test_arch_zamba2 import _model as zamba2_model
from test_trace import MAMBA1_CONFIGS, MAMBA2_CONFIGS, _random_model

STATE = "mixer.hook_ssm_state"
POSITIONS = [3, 12, 25]  # of padded_batch's 37: 3 lies in row 0's left padding (its first 6 tokens)
FAMILIES = {
    "mamba": lambda: stress(_random_model("mamba", MAMBA1_CONFIGS[0])),
    "mamba2": lambda: stress(_random_model("mamba2", MAMBA2_CONFIGS[1])),
    "falcon_mamba": lambda: falcon_mamba_model(**FALCON_MAMBA_CONFIGS[1]),
    "bamba": lambda: bamba_model(attn_layer_indices=[1]),
    "nemotron_h": lambda: nemotron_model(**NEMOTRON_CONFIGS[0]),
    "granitemoehybrid": lambda: granite_model(**GRANITE_CONFIGS[0]),
    "jamba": lambda: jamba_model(),
    "falcon_h1": lambda: falcon_h1_model(**FALCON_H1_CONFIGS[1]),
    "zamba2": lambda: zamba2_model(**ZAMBA2_CONFIGS[1]),
}
SCAN_INPUTS = [f"mixer.{u}" for u in ("hook_ssm_input", "hook_dt", "hook_B", "hook_C", "hook_y")]


def _loop(model, layer: int, units: dict, initial=None, start: int = 0, stop: int | None = None):
    """(y, states) of the loop recurrence over positions [start, stop) of one traced layer, in fp64,
    from ``initial`` (zero when None)."""
    p = adapter(model).mixer_params(layer)
    s = slice(start, stop)
    u, dt, B, C = (units[f"mixer.{u}"][:, s].double() for u in ("hook_ssm_input", "hook_dt", "hook_B", "hook_C"))
    scan = mamba1_scan if p.arch == "mamba" else mamba2_scan
    states: list[torch.Tensor] = []
    h0 = None if initial is None else initial.double()
    y = scan(u, dt, p.A.double(), B, C, p.D.double(), initial_state=h0, states=states)
    return y, states


@pytest.mark.parametrize("family", FAMILIES)
def test_state_is_the_recurrence_and_an_edit_restarts_it(family):
    # fp64 (A and D still pass through fp32, as in HF), so that segmenting the scan moves nothing above 1e-6
    model = FAMILIES[family]().double()
    ad = adapter(model)
    ssm = ad.ssm_layers()
    ids, mask = padded_batch()
    real = mask.bool()
    plain = trace(model, ids, attention_mask=mask, names=[])
    names = [f"blocks.{layer}.{u}" for layer in ssm for u in (STATE, *SCAN_INPUTS)]
    tr = trace(model, ids, attention_mask=mask, names=names, state_positions=POSITIONS)

    # the emitted state after p is the loop's h_p; zero inside row 0's left padding (no input reaches it)
    for layer in ssm:
        units = tr.layer(layer)
        _, states = _loop(model, layer, units)
        ours = units[STATE]
        assert ours.shape[1] == len(POSITIONS)
        assert ours.shape[2:] == states[0].shape[1:]
        for k, p in enumerate(POSITIONS):
            assert rel(ours[:, k], states[p]) < 1e-6, (layer, p)
        assert not ours[0, 0].any()

    # asking for the state, or an identity edit of it, leaves the logits as they were (the segmented scan
    # rounds differently from the whole one, hence a tolerance; the identity edit changes no bit)
    ident = trace(model, ids, attention_mask=mask, names=[], state_positions=POSITIONS,
                  edits={f"blocks.{layer}.{STATE}": lambda s: s for layer in ssm})
    assert rel(tr.logits[real], plain.logits[real]) < 1e-6
    assert torch.equal(ident.logits, tr.logits)

    # an edit of the first SSM layer's state after p = 12: nothing up to p moves, the layer's y after p
    # is the loop restarted from the edited state, and the logits after p change
    layer, k, p = ssm[0], 1, POSITIONS[1]
    g = torch.Generator().manual_seed(3)
    before = tr[f"blocks.{layer}.{STATE}"][:, k]
    new_state = 0.5 * before + torch.randn(before.shape, generator=g) * before.std()

    def replace(s: torch.Tensor) -> torch.Tensor:
        s = s.clone()
        s[:, k] = new_state
        return s

    edited = trace(model, ids, attention_mask=mask, names=names, state_positions=POSITIONS,
                   edits={f"blocks.{layer}.{STATE}": replace})
    assert torch.equal(edited.logits[:, : p + 1], tr.logits[:, : p + 1])
    units = edited.layer(layer)
    assert torch.allclose(units[STATE][:, k], new_state)
    y_after, _ = _loop(model, layer, units, initial=new_state, start=p + 1)
    assert rel(units["mixer.hook_y"][:, p + 1:], y_after) < 1e-6
    assert rel(units["mixer.hook_y"][:, : p + 1], tr[f"blocks.{layer}.mixer.hook_y"][:, : p + 1]) == 0
    assert rel(edited.logits[:, p + 1:], tr.logits[:, p + 1:]) > 1e-3


def test_edits_at_several_positions_compose_along_the_scan():
    """Halving the state after each of 3 positions: every slot the edit returns is kept once, and the
    scan matches the loop halved at each of them in turn (positions in any order, negative counted from the end)."""
    model = _random_model("mamba", MAMBA1_CONFIGS[1])
    ids = torch.randint(0, 97, (2, 30))
    name = f"blocks.0.{STATE}"
    tr = trace(model, ids, names=["blocks.0.*"], state_positions=[-5, 4, 11],
               edits={name: lambda s: 0.5 * s})
    units = tr.layer(0)
    h, start, ys, kept = None, 0, [], []
    for p in (4, 11, 25):
        y, states = _loop(model, 0, units, initial=h, start=start, stop=p + 1)
        ys.append(y)
        h = 0.5 * states[-1]
        kept.append(h)
        start = p + 1
    ys.append(_loop(model, 0, units, initial=h, start=start)[0])
    assert rel(units["mixer.hook_y"], torch.cat(ys, dim=1)) < 1e-5
    assert rel(units[STATE], torch.stack(kept, dim=1)) < 1e-5


def _hf_logits_with_post(model, layer: int, post: torch.Tensor, ids):
    """The model's own logits with the input of layer ``layer``'s out_proj replaced by ``post``."""
    hook = model.backbone.layers[layer].mixer.out_proj.register_forward_pre_hook(
        lambda mod, args: (post.to(args[0].dtype),))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        hook.remove()


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_edited_logits_equal_the_models_forward_fed_the_restarted_loop(kind):
    """End to end: a state edit in layer 0 gives the logits of the model's own forward whose layer-0
    out_proj input is recomputed from the loop recurrence restarted at the edited state."""
    model = stress(_random_model(kind, MAMBA1_CONFIGS[0] if kind == "mamba" else MAMBA2_CONFIGS[0]))
    ids = torch.randint(0, 97, (2, 40))
    p = 17
    tr = trace(model, ids, names=["blocks.0.*"], state_positions=[p],
               edits={f"blocks.0.{STATE}": lambda s: -2.0 * s})
    units = tr.layer(0)
    y0, states = _loop(model, 0, units, stop=p + 1)
    y1, _ = _loop(model, 0, units, initial=-2.0 * states[-1], start=p + 1)
    y = torch.cat([y0, y1], dim=1).float()
    gate = F.silu(units["mixer.hook_gate_pre"].float())
    if kind == "mamba":
        post = y * gate
    else:
        mixer = model.backbone.layers[0].mixer
        v = (y * gate).unflatten(-1, (mixer.n_groups, -1))
        post = mixer.norm.weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + mixer.norm.variance_epsilon)
                                    ).flatten(-2)
    ref = _hf_logits_with_post(model, 0, post, ids)
    assert rel(tr.logits, ref) < 1e-4
    assert rel(trace(model, ids, names=[]).logits, ref) > 1e-2  # the edit mattered


def test_state_needs_positions_and_stays_out_of_the_default():
    model = _random_model("mamba2", MAMBA2_CONFIGS[0])
    ids = torch.randint(0, 97, (2, 20))
    for names in ("mixer.hook_ssm_state", f"blocks.1.{STATE}", ["mixer.hook_post", "*ssm_state"]):
        with pytest.raises(ValueError, match="state_positions"):
            trace(model, ids, names=names)
    with pytest.raises(ValueError, match="state_positions"):
        trace(model, ids, names=[], edits={f"blocks.0.{STATE}": lambda s: s})
    assert not [n for n in trace(model, ids) if n.endswith(STATE)]
    assert not [n for n in trace(model, ids, names="blocks.0.*") if n.endswith(STATE)]
    with_state = trace(model, ids, state_positions=[0, 19, 5, 5])
    assert with_state[f"blocks.1.{STATE}"].shape == (2, 3, 8, 8, 8)  # [b, K, H, P, N]
    for bad in ([20], [-21]):
        with pytest.raises(ValueError, match="outside the sequence"):
            trace(model, ids, state_positions=bad)
    with pytest.raises(ValueError, match="empty"):
        trace(model, ids, state_positions=[])
    with pytest.raises(KeyError, match="no hook named"):
        trace(model, ids, names="mixer.hook_ssm_stat", state_positions=[1])


def test_a_transformer_has_no_state():
    model = _random_model("gpt2", dict(n_embd=32, n_head=4))
    ids = torch.randint(0, 97, (2, 12))
    assert trace(model, ids, names="*hook_post", state_positions=[3]).keys() == {
        "blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"}
    with pytest.raises(KeyError):
        trace(model, ids, names=STATE, state_positions=[3])
