"""Knockout inside the scan (issue 20, item 3; Endy et al. 2025): token j's term removed from token i's output.

Reference: the explicit recurrence h ← exp(Δ_s·A) ⊙ h + [term kept]·Δ_s·B_s·u_s over s ≤ i, written here
as a loop per target position i in fp64, on the layer's own traced scan inputs; y_i = C_i·h + D·u_i.
The knocked-out trace must give that y at the layer and, downstream, the logits of the same forward
with the layer's y replaced by the loop's (a plain edit, no knockout code involved).
"""

import pytest
import torch

from family_check import rel
from mambascope.arch import adapter
from mambascope.hooks import run_with_hooks
from mambascope.interventions.knockout import knockout_edits, knockout_grid
from mambascope.interventions.patching import activation_patching
from mambascope.ssm.knockout import Knockout
from mambascope.trace import trace
from test_ssm_state import FAMILIES
from test_trace import MAMBA1_CONFIGS, MAMBA2_CONFIGS, _random_model

SCAN = [f"mixer.{u}" for u in ("hook_ssm_input", "hook_dt", "hook_B", "hook_C", "hook_y")]
L = 18
TOL = 1e-10  # fp64: the loop and the scan differ only by summation order


def _model(kind):
    from family_check import stress

    cfg = MAMBA1_CONFIGS[0] if kind == "mamba" else MAMBA2_CONFIGS[1]
    return stress(_random_model(kind, cfg)).double()


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def model(request):
    return _model(request.param)


def _ids(model, b=2, seed=3):
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(1, vocab, (b, L), generator=torch.Generator().manual_seed(seed))


def loop_y(model, layer, units, dropped):
    """The scan output [b, L, E] of the explicit recurrence, for each target i summing the terms s ≤ i
    with (i, s) not in ``dropped`` (a set of (target, source) pairs, or a function row -> that set)."""
    p = adapter(model).mixer_params(layer)
    u, dt, B, C = (units[n].double() for n in SCAN[:4])
    A, D = p.A.double(), p.D.double()
    b, n = u.shape[:2]
    y = torch.zeros(b, n, p.d_inner, dtype=torch.float64)
    for r in range(b):
        drop = dropped(r) if callable(dropped) else dropped
        for i in range(n):
            if p.arch == "mamba":
                h = torch.zeros(p.d_inner, p.d_state, dtype=torch.float64)
                for s in range(i + 1):
                    h = torch.exp(dt[r, s, :, None] * A) * h
                    if (i, s) not in drop:
                        h = h + dt[r, s, :, None] * B[r, s][None, :] * u[r, s, :, None]
                y[r, i] = h @ C[r, i] + D * u[r, i]
            else:
                H, P = p.n_heads, p.head_dim
                g = torch.arange(H) // (H // p.n_groups)
                uh = u[r].reshape(n, H, P)
                h = torch.zeros(H, P, p.d_state, dtype=torch.float64)
                for s in range(i + 1):
                    h = torch.exp(dt[r, s] * A)[:, None, None] * h
                    if (i, s) not in drop:
                        h = h + dt[r, s][:, None, None] * uh[s][:, :, None] * B[r, s][g][:, None, :]
                skip = D[:, None] * uh[i]  # the mixer keeps an fp64 model's skip term in fp64
                y[r, i] = ((h @ C[r, i][g][:, :, None])[..., 0] + skip).reshape(-1)
    return y


def _check(model, layer, edit, dropped, ids):
    name = f"blocks.{layer}.mixer.hook_y"
    clean = trace(model, ids, names=[f"blocks.{layer}.{u}" for u in SCAN])
    units = clean.layer(layer)
    ref = loop_y(model, layer, units, dropped)
    # the reference loop with nothing dropped is the model's own scan: the loop is right
    assert rel(loop_y(model, layer, units, set()), units["mixer.hook_y"]) < TOL
    knocked = trace(model, ids, names=[name], edits={name: edit})
    assert rel(knocked[name], ref) < TOL
    replaced = trace(model, ids, names=[], edits={name: lambda y: ref.to(y.dtype)})
    assert rel(knocked.logits, replaced.logits) < TOL
    assert rel(knocked.logits, clean.logits) > 1e-6  # the knockout did something
    return knocked


@pytest.mark.parametrize("layer", [0, 1])
def test_j_to_i_is_the_recurrence_without_that_term(model, layer):
    _check(model, layer, Knockout(4, targets=(11,)), {(11, 4)}, _ids(model))


def test_j_to_every_later_token(model):
    j = 5
    knocked = _check(model, 1, Knockout(j), {(i, j) for i in range(j + 1, L)}, _ids(model))
    clean = trace(model, _ids(model), names=["blocks.1.mixer.hook_y"])
    # positions up to j (j's own output included) are untouched: bit for bit
    assert torch.equal(knocked["blocks.1.mixer.hook_y"][:, :j + 1], clean["blocks.1.mixer.hook_y"][:, :j + 1])


def test_targets_from_j_on_equal_zeroing_js_scan_input(model):
    """Targets i ≥ j drop j's term everywhere: the scan with x_j·Δ_j·B_j zeroed, everything else kept."""
    j = 6
    _check(model, 0, Knockout(j, targets=range(j, L)), {(i, j) for i in range(j, L)}, _ids(model))


def test_several_pairs_and_per_row_knockouts(model):
    ids = _ids(model)
    _check(model, 1, [Knockout(3, (7,)), Knockout(5, (7, 9)), Knockout(-3, (-1,))],
           {(7, 3), (7, 5), (9, 5), (L - 1, L - 3)}, ids)
    rows = [Knockout(2, rows=(0,)), Knockout(8, targets=(12, 13), rows=(1,))]
    per_row = [{(i, 2) for i in range(3, L)}, {(12, 8), (13, 8)}]
    _check(model, 0, rows, lambda r: per_row[r], ids)


def test_grad_path_and_run_with_hooks_agree(model):
    ids = _ids(model)
    name = "blocks.1.mixer.hook_y"
    plain = trace(model, ids, names=[name], edits={name: Knockout(4)})
    with_grad = trace(model, ids, names=[name], edits={name: Knockout(4)}, grad=True)
    assert rel(with_grad[name].detach(), plain[name]) < TOL
    logits = run_with_hooks(model, ids, fwd_hooks=[(name, Knockout(4))])
    assert rel(logits, plain.logits) < TOL


@pytest.mark.parametrize("family", ["falcon_mamba", "bamba"])
def test_hybrid_and_variant_ssm_layers(family):
    model = FAMILIES[family]().double()
    layer = adapter(model).ssm_layers()[-1]
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(1, vocab, (1, L), generator=torch.Generator().manual_seed(0))
    _check(model, layer, Knockout(4), {(i, 4) for i in range(5, L)}, ids)


def test_knockout_edits_cover_every_ssm_layer(model):
    """knockout_edits(j) = the same Knockout on every SSM layer: equal to the edits written by hand."""
    ids = _ids(model, b=1)
    edits = knockout_edits(model, 4)
    assert set(edits) == {f"blocks.{layer}.mixer.hook_y" for layer in adapter(model).ssm_layers()}
    by_hand = trace(model, ids, names=[], edits={n: Knockout(4) for n in edits}).logits
    assert rel(trace(model, ids, names=[], edits=edits).logits, by_hand) < TOL


def test_attention_knockout_is_the_masked_softmax():
    """On attention layers knockout_edits removes j from the keys of every later query and renormalises:
    the attention of a causal mask that also hides j (Geva et al. 2023), recomputed here by hand."""
    model = _random_model("gpt2", dict(n_embd=32, n_head=4)).double()
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    j = 3
    names = [f"blocks.{layer}.attn.hook_{u}" for layer in range(2) for u in ("q", "k", "v", "pattern")]
    knocked = trace(model, ids, names=names, edits=knockout_edits(model, j))
    for layer in range(2):
        q, k = knocked[f"blocks.{layer}.attn.hook_q"], knocked[f"blocks.{layer}.attn.hook_k"]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        allowed = torch.ones(12, 12, dtype=torch.bool).tril()
        allowed[j + 1:, j] = False
        expected = torch.softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1)
        # the traced pattern's scores are computed in fp32 (arch/parts.py attention): 1e-6, not fp64's 1e-10
        assert rel(knocked[f"blocks.{layer}.attn.hook_pattern"], expected) < 1e-6


def test_knockout_grid_is_one_forward_per_cell(model):
    """Each cell of the grid equals the metric of its own knocked-out forward."""
    ids = _ids(model, b=1)
    target = int(trace(model, ids, names=[]).logits[0, -1].argmax())
    grid = knockout_grid(model, ids, target=target, positions=[2, 9, L - 1], batch_size=4)
    for r, layer in enumerate(grid.layers):
        for c, j in enumerate(grid.positions):
            logits = trace(model, ids, names=[], edits={f"blocks.{layer}.mixer.hook_y": Knockout(j)}).logits
            expected = torch.log_softmax(logits[0, -1].double(), -1)[target]
            assert abs(float(grid.logprob[r, c]) - float(expected)) < 1e-9
    assert torch.all(grid.logprob[:, -1] == grid.clean_logprob)  # nothing after the last token to knock out of


def test_patching_unit_type_knockout(model):
    """``unit_types=["knockout"]`` in activation_patching: the noising effect of each (layer, source) knockout."""
    ids = _ids(model, b=1)
    corrupt = ids.clone()
    corrupt[0, 2] = (corrupt[0, 2] + 1) % 97
    target = int(trace(model, ids, names=[]).logits[0, -1].argmax())
    result = activation_patching(model, ids, corrupt, target=target, metric="logprob", unit_types=["knockout"],
                                 direction="noise", positions=[2, 9])
    grid = result.grids["knockout"]
    for r, row in enumerate(grid.rows):
        for c, j in enumerate(grid.positions):
            logits = trace(model, ids, names=[], edits={row.name: Knockout(j)}).logits
            m = float(torch.log_softmax(logits[0, -1].double(), -1)[target])
            expected = (m - result.corrupt_metric) / (result.clean_metric - result.corrupt_metric)
            assert abs(float(grid.effect[r, c]) - expected) < 1e-9
    with pytest.raises(ValueError, match="noise"):
        activation_patching(model, ids, corrupt, target=target, unit_types=["knockout"], direction="denoise")


def test_bad_knockouts(model):
    ids = _ids(model, b=1)
    with pytest.raises(ValueError, match="outside the sequence"):
        trace(model, ids, names=[], edits={"blocks.0.mixer.hook_y": Knockout(L)})
    with pytest.raises(ValueError, match="hook_y"):
        trace(model, ids, names=[], edits={"blocks.0.mixer.hook_post": Knockout(1)})
    with pytest.raises(ValueError, match="cannot be combined"):
        trace(model, ids, names=[], state_positions=[3],
              edits={"blocks.0.mixer.hook_y": Knockout(1), "blocks.0.mixer.hook_ssm_state": lambda s: s})
    with pytest.raises(ValueError, match="row 3"):
        trace(model, ids, names=[], edits={"blocks.0.mixer.hook_y": Knockout(1, rows=(3,))})
    with pytest.raises(ValueError, match="chained"):
        run_with_hooks(model, ids, fwd_hooks=[("blocks.0.mixer.hook_y", Knockout(1)),
                                              ("blocks.0.mixer.hook_y", lambda t, hook: t)])
