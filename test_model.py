"""Tests of the GPT and its Mixture-of-Experts block (model.py), with NITP removed where it plays no part."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model, tiny_nitp, tokens
from model import GPT, GPTConfig, MoE
from nitp import NITP, NITPConfig, TrainingLoss

# ---------------------------------------------------------------------------------------------------- the model

def test_the_model_is_causal():
    """The logits at t do not depend on tokens after t."""
    model = tiny_model()
    idx = tokens()
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 3) % 50
    a, b = model(idx).logits, model(changed).logits
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7], b[:, 7])


def test_embeddings_are_tied_and_residual_projections_scaled():
    """The LM head is the token embedding; projections into the residual stream start at 0.02/sqrt(2·n_layer)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=8, n_head=4, n_embd=256))
    assert model.lm_head.weight is model.wte.weight
    assert model.blocks[0].mlp.up.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)


def assert_overfits_one_batch(model, nitp, device="cpu", steps=300):
    """Train on one repeated batch: the LM loss must reach near zero and the NITP loss fall to a quarter."""
    model, nitp = model.to(device), nitp.to(device)
    idx, targets = tokens(B=2, T=16).to(device), tokens(B=2, T=16, seed=1).to(device)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(nitp.parameters()), lr=1e-2, weight_decay=0)
    first = None
    for _ in range(steps):
        loss, parts = TrainingLoss(model, nitp)(idx, targets)
        first = first or {k: v.item() for k, v in parts.items()}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert parts["lm"].item() < 0.05 < first["lm"]
    assert parts["nitp"].item() < 0.25 * first["nitp"]


def test_a_tiny_model_overfits_a_tiny_batch_with_nitp_on(device):
    """Both losses fall on one repeated batch: the LM loss to near zero, and the NITP loss well below its start."""
    model, nitp = tiny_model(n_layer=2), tiny_nitp(n_layer=2)
    assert_overfits_one_batch(model, nitp, device)


def test_generate_extends_the_sequence_and_never_touches_the_nitp_head(device):
    """generate() uses the backbone alone: it works with no NITP module anywhere."""
    model = tiny_model().to(device)
    out = model.generate(tokens(B=2, T=3).to(device), max_new_tokens=20, top_k=5)  # longer than block_size
    assert out.shape == (2, 23) and out.max() < 50


def test_config_validation():
    """Bad shapes and NITP settings raise ValueError with a message naming the problem."""
    cases = [(lambda: GPTConfig(n_embd=100, n_head=3), "divisible"),
             (lambda: GPTConfig(block_size=1), "block_size"),
             (lambda: NITPConfig(lam=-0.5), "lambda"),
             (lambda: NITP(NITPConfig(layer=4), n_layer=4, n_embd=16), "0..3"),
             (lambda: NITP(NITPConfig(layer=-1), n_layer=4, n_embd=16), "0..3")]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


# ---------------------------------------------------------------------------------------------------- MoE

def moe_layer(n_expert=4, top_k=2, n_shared=0, seed=0) -> MoE:
    torch.manual_seed(seed)
    return MoE(GPTConfig(n_embd=16, n_head=2, n_expert=n_expert, experts_per_token=top_k, n_shared=n_shared))


def dense_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by its gate, with zero gate outside the token's top-k."""
    flat = x.reshape(-1, x.size(-1))                                            # (N, d)
    _, _, gates, chosen = moe.route(flat)
    full_gates = torch.zeros(flat.size(0), len(moe.experts)).scatter(1, chosen, gates)  # (N, E)
    all_outputs = torch.stack([expert(flat) for expert in moe.experts], dim=1)        # (N, E, d)
    out = (full_gates.unsqueeze(-1) * all_outputs).sum(dim=1)
    out = out + sum((expert(flat) for expert in moe.shared), torch.zeros_like(flat))
    return out.view_as(x)


@pytest.mark.parametrize("n_expert,top_k,n_shared", [(4, 1, 0), (4, 2, 1), (8, 2, 0), (4, 4, 0)])
def test_moe_equals_the_dense_reference(n_expert, top_k, n_shared):
    """Grouped dispatch gives the same output as running every expert on every token (k = E included)."""
    moe = moe_layer(n_expert, top_k, n_shared)
    x = torch.randn(3, 10, 16)
    out, _ = moe(x)
    assert torch.allclose(out, dense_reference(moe, x), atol=1e-5)


def test_gates_are_the_router_probabilities_of_the_chosen_experts():
    """Each token's k gates are its k largest router probabilities, not renormalized: they sum to at most 1."""
    _, probs, gates, chosen = moe_layer(8, 3).route(torch.randn(50, 16))
    assert gates.shape == chosen.shape == (50, 3)
    assert torch.equal(gates, probs.gather(1, chosen)) and (gates.sum(dim=-1) < 1).all()
    assert all(len(set(row)) == 3 for row in chosen.tolist())  # k distinct experts per token


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_router_learns_from_the_lm_loss_at_every_k(top_k):
    """With the balancing and z losses off, the LM loss alone still reaches the router, top-1 included
    (a renormalized single gate would be exactly 1 and carry no gradient)."""
    model = tiny_model(n_expert=4, experts_per_token=top_k, aux_loss_coef=0.0)
    model(tokens(), tokens(seed=1)).loss.backward()
    assert all(block.mlp.router.weight.grad.abs().max() > 0 for block in model.blocks[1:])


def test_each_expert_runs_only_on_its_tokens():
    """The experts together process N·k token rows: cost grows with k, not with E."""
    for n_expert, top_k in [(4, 1), (16, 1), (16, 2)]:
        moe = moe_layer(n_expert, top_k)
        rows = []
        for expert in moe.experts:
            expert.register_forward_hook(lambda m, inputs, output: rows.append(inputs[0].size(0)))
        moe(torch.randn(2, 10, 16))
        assert sum(rows) == 20 * top_k


def test_balancing_loss_is_one_when_uniform_and_larger_when_collapsed():
    """E · Σ f_i P_i: a router with equal probabilities gives exactly 1; one expert taking every token gives ≈ E."""
    moe = moe_layer(n_expert=4, top_k=1)
    x = torch.rand(2, 10, 16) + 0.1  # all features positive
    with torch.no_grad():
        moe.router.weight.zero_()
    assert moe(x)[1]["balance"].item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        moe.router.weight[0] = 10.0  # expert 0 wins every token, with probability ≈ 1
    stats = moe(x)[1]
    assert stats["share"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert stats["balance"].item() == pytest.approx(4.0, rel=1e-3)


def test_gradients_reach_the_router_and_every_selected_expert():
    """The output's gradient reaches the router (through the gates) and each expert that got tokens, only those."""
    moe = moe_layer(n_expert=8, top_k=2)
    out, stats = moe(torch.randn(1, 3, 16))  # 3 tokens x 2 slots: at most 6 of 8 experts are used
    out.pow(2).sum().backward()
    assert moe.router.weight.grad.abs().max() > 0
    for used, expert in zip((stats["share"] > 0).tolist(), moe.experts):
        got_grad = expert.up.weight.grad is not None and expert.up.weight.grad.abs().max() > 0
        assert got_grad == used


def test_one_expert_behaves_as_the_dense_mlp():
    """E = 1: every token goes to the single expert with gate 1, so the layer is that MLP; and a GPT with
    n_expert=1 has no MoE layer at all."""
    moe = moe_layer(n_expert=1, top_k=1)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(moe(x)[0], moe.experts[0](x), atol=1e-6)
    model = tiny_model()
    assert not any(isinstance(m, MoE) for m in model.modules())
    assert model(tokens()).aux_loss is None


def test_moe_model_layout_and_active_parameters():
    """The first n_dense_layers blocks stay dense; active parameters count k of E routed experts."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16, n_expert=4, experts_per_token=1,
                          n_shared=1, n_dense_layers=1))
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == [False, True, True]
    expert = 8 * 16 * 16  # up and down, d x 4d each
    assert model.num_params() - model.num_params(active=True) == 2 * 3 * expert


def test_invalid_moe_settings_are_refused():
    """k < 1, k > E, S < 0, or no MoE layer left give a clear ValueError."""
    for kwargs, message in [(dict(n_expert=4, experts_per_token=0), "--top-k"), (dict(n_expert=4, experts_per_token=5), "--top-k"),
                            (dict(n_expert=4, experts_per_token=1, n_shared=-1), "n_shared"),
                            (dict(n_expert=4, experts_per_token=1, n_layer=2, n_dense_layers=2), "no MoE layer")]:
        with pytest.raises(ValueError, match=message):
            GPTConfig(**kwargs)


def test_moe_aux_loss_stays_out_of_the_lm_loss():
    """For an MoE model the LM loss is the pure cross-entropy; the aux loss is reported apart and added to the
    training total only."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, n_expert=4, experts_per_token=2,
                          aux_loss_coef=0.5))
    idx, targets = tokens(), tokens(seed=1)
    out = model(idx, targets)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits.reshape(-1, 50), targets.reshape(-1)))
    total, parts = TrainingLoss(model, tiny_nitp(n_layer=2))(idx, targets)
    assert set(parts) == {"lm", "nitp", "moe_aux"} and parts["moe_aux"].item() >= 0.5  # balance >= 1
    assert total.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-6)


def test_a_tiny_moe_model_with_nitp_overfits_a_tiny_batch(device):
    """NITP works unchanged on an MoE model: both losses fall on one repeated batch."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, n_expert=4, experts_per_token=2))
    nitp = tiny_nitp(n_layer=2)
    assert_overfits_one_batch(model, nitp, device)
