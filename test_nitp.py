"""Tests: one property each. Run with `python -m pytest -q`. Hermetic: no network, CPU only."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken.load  # the module whose download function the offline test replaces
import torch
import torch.nn.functional as F

import bench
import compare
import data
import devices
import probe
import train
from model import GPT, MLP, GPTConfig, MoE
from nitp import NITP, NITPConfig, anisotropy, default_layer, effective_rank, training_loss

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared"
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--log-interval", "5"]


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch):
    """Keep the token cache out of the repository; share it across tests so each corpus is tokenized once."""
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path_factory.getbasetemp() / "token_cache")


def tiny_model(n_layer=4, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=n_layer, n_head=2, n_embd=16, **kw))


def tiny_nitp(n_layer=4, d=16, seed=1, **kw) -> NITP:
    torch.manual_seed(seed)
    return NITP(NITPConfig(**kw), n_layer=n_layer, n_embd=d)


def tokens(B=3, T=12, seed=0) -> torch.Tensor:
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(seed))


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------- the loss

def test_cosine_loss_is_0_for_parallel_and_1_for_orthogonal_vectors():
    """With no head, the term at t is 1 - cos(h_t, z_{t+1}): 0 when they point the same way, 1 when orthogonal."""
    nitp = tiny_nitp(d=4, head="none")
    e0, e1 = torch.eye(4)[0], torch.eye(4)[1]
    hidden = torch.stack([e0, e0, e0]).unsqueeze(0)          # (1, 3, 4)
    parallel = torch.stack([e1, 2 * e0, 5 * e0]).unsqueeze(0)  # z_1, z_2 parallel to h_0, h_1 (z_0 unused)
    orthogonal = torch.stack([e0, e1, -3 * e1]).unsqueeze(0)
    assert nitp(hidden, parallel).item() == pytest.approx(0.0, abs=1e-6)
    assert nitp(hidden, orthogonal).item() == pytest.approx(1.0, abs=1e-6)


def test_the_term_at_t_targets_the_block_k_output_at_t_plus_1():
    """Changing the token at t+1 changes z_{t+1} and so the target of the term at t; z_t is not its target."""
    model, nitp = tiny_model(), tiny_nitp()
    idx = tokens()
    t = 5
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % 50
    out, out_changed = model(idx), model(changed)
    k = nitp.layer
    # Keep h fixed, swap in the other z: only the term whose target is z_{t+1} may move.
    before = nitp.distances(out.hidden, out.block_outputs[k])             # (B, T-1)
    after = nitp.distances(out.hidden, out_changed.block_outputs[k])
    moved = (before - after).abs().amax(dim=0) > 1e-6           # (T-1,)
    assert moved[t] and not moved[:t].any()
    # The term at t does not look at z_t: changing only z_t leaves every term as it was except t-1.
    z = out.block_outputs[k].clone()
    z[:, t] += 1.0
    moved = (before - nitp.distances(out.hidden, z)).abs().amax(dim=0) > 1e-6
    assert moved.nonzero().flatten().tolist() == [t - 1]


def test_the_last_position_contributes_nothing():
    """h at the last position has no t+1: L_NITP has no gradient for it, and there are T-1 terms."""
    model, nitp = tiny_model(), tiny_nitp()
    out = model(tokens(T=10))
    hidden, z = out.hidden.detach().requires_grad_(), out.block_outputs[nitp.layer]
    loss = nitp(hidden, z)
    loss.backward()
    assert nitp.distances(hidden, z).shape == (3, 9)
    assert hidden.grad[:, -1].abs().max() == 0
    assert hidden.grad[:, :-1].abs().amax(dim=-1).min() > 0


def backbone_grads(model, nitp, idx):
    """Gradients of L_NITP alone on every backbone parameter."""
    model.zero_grad()
    out = model(idx)
    nitp(out.hidden, out.block_outputs[nitp.layer]).backward()
    return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in model.named_parameters()}


def test_no_gradient_flows_through_the_target():
    """With sg(z), layers <= k get NITP gradient only through h_t: the same gradient as with z computed
    separately and treated as a constant."""
    model, nitp = tiny_model(), tiny_nitp()
    idx = tokens()
    grads = backbone_grads(model, nitp, idx)
    with torch.no_grad():
        constant_z = model(idx).block_outputs[nitp.layer]
    model.zero_grad()
    out = model(idx)
    nitp(out.hidden, constant_z).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-7, rtol=1e-5), name
    assert grads["blocks.0.attn.qkv.weight"].abs().max() > 0  # the h_t path does reach block 1


def test_the_projection_head_receives_gradients():
    """Every weight of the SwiGLU head gets a non-zero gradient from L_NITP."""
    model, nitp = tiny_model(), tiny_nitp()
    out = model(tokens())
    nitp(out.hidden, out.block_outputs[nitp.layer]).backward()
    assert sum(p.numel() for p in nitp.parameters()) == 12 * 16 * 16
    for name, p in nitp.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_lambda_zero_is_exactly_the_ntp_baseline():
    """λ = 0 gives bit-identical loss and backbone gradients to NTP without NITP."""
    idx, targets = tokens(), tokens(seed=1)
    results = []
    for nitp in (None, tiny_nitp(lam=0.0)):
        model = tiny_model()
        loss, _ = training_loss(model, nitp, idx, targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_ntp, grads_ntp), (loss_zero, grads_zero) = results
    assert torch.equal(loss_ntp, loss_zero)
    assert all(torch.equal(a, b) for a, b in zip(grads_ntp, grads_zero))


def test_the_backbone_runs_once_per_training_step():
    """NITP takes z from the same forward pass: each block and the embedding run exactly once per step."""
    model, nitp = tiny_model(), tiny_nitp()
    calls = []
    for name, module in [("wte", model.wte), *((f"block{i}", b) for i, b in enumerate(model.blocks))]:
        module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    loss, parts = training_loss(model, nitp, tokens(), tokens(seed=1))
    loss.backward()
    assert set(parts) == {"lm", "nitp"}
    assert sorted(calls) == sorted(["wte", "block0", "block1", "block2", "block3"])


def test_the_dense_model_compiles_to_one_graph_with_every_block_output():
    """--compile compiles the model; the dense forward pass, returning every block's output, has no graph break."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(tiny_model())(tokens(), tokens(seed=1))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_total_loss_is_ntp_plus_lambda_times_nitp():
    """The training loss is L_NTP + λ·L_NITP, with the parts reported separately."""
    loss, parts = training_loss(tiny_model(), tiny_nitp(lam=0.7), tokens(), tokens(seed=1))
    assert loss.item() == pytest.approx(parts["lm"].item() + 0.7 * parts["nitp"].item(), rel=1e-6)


def test_default_target_layer_is_a_fifth_of_the_depth_and_never_the_embeddings():
    """k = round(0.2 · n_layer), at least 1: the paper's 5 of 24 and 6 of 28, but 3 of 17 where it took 4."""
    assert [default_layer(n) for n in (1, 4, 12, 17, 24, 28)] == [1, 1, 2, 3, 5, 6]


def test_layer_zero_targets_the_embeddings():
    """k = 0 takes the embedding output: token plus position embeddings."""
    model = tiny_model()
    idx = tokens()
    out = model(idx)
    expected = model.wte(idx) + model.wpe(torch.arange(idx.size(1)))
    assert len(out.block_outputs) == 4 + 1 and torch.equal(out.block_outputs[0], expected)


# ---------------------------------------------------------------------------------------------------- ablations

def test_nitp_layer_selects_which_block_output_is_the_target():
    """--nitp-layer k: the target is the output of block k (1-based), from the same pass."""
    model = tiny_model()
    seen = []
    model.blocks[2].register_forward_hook(lambda m, i, o: seen.append(o[0]))
    out = model(tokens())
    assert torch.equal(out.block_outputs[3], seen[0])
    nitp = tiny_nitp(layer=3)
    _, parts = training_loss(model, nitp, tokens(), tokens(seed=1))
    assert parts["nitp"].item() == pytest.approx(nitp(out.hidden, seen[0]).item(), rel=1e-6)


def test_shift_zero_pairs_each_position_with_itself():
    """--nitp-shift 0: T terms, and the term at t moves only when z_t moves."""
    model, nitp = tiny_model(), tiny_nitp(shift=0)
    out = model(tokens())
    before = nitp.distances(out.hidden, out.block_outputs[nitp.layer])
    z = out.block_outputs[nitp.layer].clone()
    z[:, 4] += 1.0
    moved = (before - nitp.distances(out.hidden, z)).abs().amax(dim=0) > 1e-6
    assert before.shape == (3, 12) and moved.nonzero().flatten().tolist() == [4]


def test_no_stopgrad_lets_gradient_reach_the_target_path():
    """--nitp-no-stopgrad: layers <= k also get gradient through z, so their NITP gradient changes; layers
    above k are reached only through h and do not change."""
    model, idx = tiny_model(), tokens()
    with_sg = backbone_grads(model, tiny_nitp(), idx)
    without_sg = backbone_grads(model, tiny_nitp(stopgrad=False), idx)
    assert not torch.allclose(with_sg["blocks.0.mlp.up.weight"], without_sg["blocks.0.mlp.up.weight"])
    assert torch.allclose(with_sg["blocks.3.mlp.up.weight"], without_sg["blocks.3.mlp.up.weight"])


@pytest.mark.parametrize("head,n_weights", [("swiglu", 12 * 16 * 16), ("linear", 16 * 16), ("none", 0)])
def test_head_choice_sets_the_projection(head, n_weights):
    """--nitp-head: SwiGLU (12d² weights), one d x d matrix, or none (h_t compared with z_{t+1} directly)."""
    nitp = tiny_nitp(head=head)
    assert sum(p.numel() for p in nitp.parameters()) == n_weights
    if head == "none":
        h, z = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
        expected = 1 - F.cosine_similarity(h[:, :-1], z[:, 1:], dim=-1)
        assert torch.allclose(nitp.distances(h, z), expected)


@pytest.mark.parametrize("loss,reference", [("mse", F.mse_loss), ("smooth_l1", F.smooth_l1_loss)])
def test_loss_choice_sets_the_distance(loss, reference):
    """--nitp-loss mse / smooth_l1: the same pairs (P(h_t), z_{t+1}), another distance on the raw vectors."""
    nitp = tiny_nitp(loss=loss)
    h, z = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    assert torch.allclose(nitp(h, z), reference(nitp.head(h[:, :-1]), z[:, 1:]), atol=1e-6)


def test_nitp_start_switches_the_loss_on_at_that_step():
    """--nitp-start S: before step S the loss is plain NTP and the head gets no gradient; from S on it is NITP."""
    model, nitp = tiny_model(), tiny_nitp(start=5)
    idx, targets = tokens(), tokens(seed=1)
    for step, expect_nitp in [(4, False), (5, True)]:
        nitp.zero_grad()
        loss, parts = training_loss(model, nitp, idx, targets, step=step)
        loss.backward()
        assert ("nitp" in parts) == expect_nitp
        assert (nitp.head.down.weight.grad is not None) == expect_nitp


def test_ablation_flags_reach_the_nitp_config(tmp_path):
    """Each --nitp-* flag of train.py sets exactly its field of NITPConfig."""
    args = train.parse_args(TINY + ["--nitp", "--nitp-lambda", "0.5", "--nitp-layer", "0", "--nitp-shift", "0",
                                    "--nitp-no-stopgrad", "--nitp-head", "linear", "--nitp-loss", "mse",
                                    "--nitp-start", "7", "--out-dir", str(tmp_path)])
    config = train.setup(args)["nitp"].config
    assert config == NITPConfig(lam=0.5, layer=0, shift=0, stopgrad=False, head="linear", loss="mse", start=7)
    assert train.setup(train.parse_args(TINY + ["--nitp"]))["nitp"].config == NITPConfig()


# ---------------------------------------------------------------------------------------------------- metrics

def test_effective_rank_of_isotropic_gaussian_states_is_close_to_d():
    """Isotropic Gaussian states use every direction equally: effective rank ≈ d."""
    states = torch.randn(20000, 32, generator=torch.Generator().manual_seed(0))
    assert 0.97 * 32 < effective_rank(states) <= 32


def test_effective_rank_of_rank_one_states_is_one():
    """States on one line through a point have a single non-zero eigenvalue: effective rank 1."""
    g = torch.Generator().manual_seed(0)
    states = torch.randn(500, 1, generator=g) * torch.randn(1, 32, generator=g) + torch.randn(1, 32, generator=g)
    assert effective_rank(states) == pytest.approx(1.0, abs=1e-3)


def test_effective_rank_of_two_equal_directions_is_two():
    """Two orthogonal directions with equal variance: entropy log 2, effective rank 2."""
    states = torch.zeros(4, 8)
    states[0, 0], states[1, 0], states[2, 1], states[3, 1] = 1, -1, 1, -1
    assert effective_rank(states) == pytest.approx(2.0, abs=1e-5)


def test_anisotropy_known_answers():
    """Identical rows give cosine 1; a vector and its negative give -1; orthogonal rows give 0."""
    v = torch.randn(16)
    assert anisotropy(v.repeat(10, 1)) == pytest.approx(1.0, abs=1e-6)
    assert anisotropy(torch.stack([v, -v])) == pytest.approx(-1.0, abs=1e-6)
    assert anisotropy(torch.eye(16)) == pytest.approx(0.0, abs=1e-6)


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


def assert_overfits_one_batch(model, nitp, steps=300):
    """Train on one repeated batch: the LM loss must reach near zero and the NITP loss fall to a quarter."""
    idx, targets = tokens(B=2, T=16), tokens(B=2, T=16, seed=1)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(nitp.parameters()), lr=1e-2, weight_decay=0)
    first = None
    for _ in range(steps):
        loss, parts = training_loss(model, nitp, idx, targets)
        first = first or {k: v.item() for k, v in parts.items()}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert parts["lm"].item() < 0.05 < first["lm"]
    assert parts["nitp"].item() < 0.25 * first["nitp"]


def test_a_tiny_model_overfits_a_tiny_batch_with_nitp_on():
    """Both losses fall on one repeated batch: the LM loss to near zero, and the NITP loss well below its start."""
    model, nitp = tiny_model(n_layer=2), tiny_nitp(n_layer=2)
    assert_overfits_one_batch(model, nitp)


def test_generate_extends_the_sequence_and_never_touches_the_nitp_head():
    """generate() uses the backbone alone: it works with no NITP module anywhere."""
    model = tiny_model()
    out = model.generate(tokens(B=2, T=3), max_new_tokens=20, top_k=5)  # longer than block_size
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
    return MoE(GPTConfig(n_embd=16, n_head=2, n_expert=n_expert, top_k=top_k, n_shared=n_shared))


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
    model = tiny_model(n_expert=4, top_k=top_k, aux_loss_coef=0.0)
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
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16, n_expert=4, top_k=1,
                          n_shared=1, n_dense_layers=1))
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == [False, True, True]
    expert = 8 * 16 * 16  # up and down, d x 4d each
    assert model.num_params() - model.num_params(active=True) == 2 * 3 * expert


def test_invalid_moe_settings_are_refused():
    """k < 1, k > E, S < 0, or no MoE layer left give a clear ValueError."""
    for kwargs, message in [(dict(n_expert=4, top_k=0), "top_k"), (dict(n_expert=4, top_k=5), "top_k"),
                            (dict(n_expert=4, top_k=1, n_shared=-1), "n_shared"),
                            (dict(n_expert=4, top_k=1, n_layer=2, n_dense_layers=2), "no MoE layer")]:
        with pytest.raises(ValueError, match=message):
            GPTConfig(**kwargs)


def test_moe_aux_loss_stays_out_of_the_lm_loss():
    """For an MoE model the LM loss is the pure cross-entropy; the aux loss is reported apart and added to the
    training total only."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, n_expert=4, top_k=2,
                          aux_loss_coef=0.5))
    idx, targets = tokens(), tokens(seed=1)
    out = model(idx, targets)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits.reshape(-1, 50), targets.reshape(-1)))
    total, parts = training_loss(model, tiny_nitp(n_layer=2), idx, targets)
    assert set(parts) == {"lm", "nitp", "moe_aux"} and parts["moe_aux"].item() >= 0.5  # balance >= 1
    assert total.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-6)


def test_a_tiny_moe_model_with_nitp_overfits_a_tiny_batch():
    """NITP works unchanged on an MoE model: both losses fall on one repeated batch."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, n_expert=4, top_k=2))
    nitp = tiny_nitp(n_layer=2)
    assert_overfits_one_batch(model, nitp)


# ---------------------------------------------------------------------------------------------------- probe.py

def test_linear_probe_is_near_chance_on_random_features_with_shuffled_labels():
    """Noise features and labels that mean nothing: test accuracy stays near 1/C."""
    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(800, 32, generator=g), dim=-1)
    labels = torch.randint(0, 4, (800,), generator=g)
    train_idx, test_idx = probe.split(labels)
    accuracy = probe.linear_probe_accuracy(features, labels, train_idx, test_idx)
    assert abs(accuracy - 0.25) < 0.08


def test_linear_probe_is_near_perfect_on_features_that_encode_the_label():
    """Features = the label's one-hot plus small noise: the probe finds it."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 8
    features = F.normalize(F.one_hot(labels, 32).float() + 0.05 * torch.randn(400, 32, generator=g), dim=-1)
    train_idx, test_idx = probe.split(labels)
    assert probe.linear_probe_accuracy(features, labels, train_idx, test_idx) > 0.98


def test_retrieval_scores_on_hand_made_similarities():
    """Recall@1 and MRR on matrices whose ranks are known: correct candidate first, second, third."""
    perfect = torch.eye(3)
    assert probe.retrieval_scores(perfect) == {"recall@1": 1.0, "mrr": 1.0}
    ranks_1_2_3 = torch.tensor([[0.9, 0.1, 0.2],
                                [0.8, 0.5, 0.1],   # query 1: its candidate is second
                                [0.7, 0.6, 0.3]])  # query 2: its candidate is third
    scores = probe.retrieval_scores(ranks_1_2_3)
    assert scores["recall@1"] == pytest.approx(1 / 3)
    assert scores["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_splits_are_deterministic_and_disjoint():
    """Every 4th passage of each section is a test passage: the same every time, never also a train passage."""
    labels = torch.tensor([0] * 9 + [1] * 5 + [2] * 8)
    train_a, test_a = probe.split(labels)
    train_b, test_b = probe.split(labels)
    assert torch.equal(train_a, train_b) and torch.equal(test_a, test_b)
    assert not set(train_a.tolist()) & set(test_a.tolist())
    assert sorted(train_a.tolist() + test_a.tolist()) == list(range(22))
    assert labels[test_a].tolist() == [0, 0, 1, 2, 2]


def test_pooling_ignores_positions_that_are_not_valid_tokens():
    """Padding positions do not change the pooled embedding, whatever their states hold."""
    states = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pooled = probe.mean_pool(states, mask)
    states[0, 3:] = 1e6
    assert torch.allclose(probe.mean_pool(states, mask), pooled)
    assert torch.allclose(pooled[0], F.normalize(states[0, :3].mean(dim=0), dim=0))
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(2))


def test_passages_pad_the_short_tail_and_drop_tiny_sections():
    """Sections are cut into fixed-length passages; the last one is padded and masked; short sections go."""
    sections = [("long", list(range(1, 8 * 10 + 4))), ("tiny", [1, 2, 3])]
    ids, mask, labels = probe.make_passages(sections, length=10)
    assert ids.shape == (9, 10) and labels.tolist() == [0] * 9
    assert mask[-1].tolist() == [True] * 3 + [False] * 7 and mask[:-1].all()


def test_probe_flag_scores_a_checkpoint_with_baselines(tmp_path, capsys):
    """`train.py --probe` reads the checkpoint in --out-dir, trains nothing, and reports the model, a random
    model of the same shape, bag-of-tokens and chance."""
    out = tmp_path / "run"
    train.main(TINY + ["--max-iters", "2", "--out-dir", str(out)])
    before = (out / "metrics.jsonl").read_text()
    train.main(["--probe", "--out-dir", str(out)])
    rows = json.loads((out / "probe.json").read_text())
    assert set(rows) == {"this model", "random init, same shape", "bag of tokens (its embeddings)", "chance"}
    assert all(0 <= rows[r][k] <= 1 for r in rows for k in ("probe_acc", "retrieval_recall@1", "retrieval_mrr"))
    assert (out / "metrics.jsonl").read_text() == before
    assert "probe acc" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- data

def test_byte_tokenizer_round_trips_text():
    """The default tokenizer has 256 ids and decodes back to exactly the text it encoded."""
    tok = data.get_tokenizer("bytes")
    text = "Tiny GPT — naïve café, 東京\n\ttabs and emoji 🙂"
    ids = tok.encode_ordinary(text)
    assert tok.n_vocab == 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


@pytest.mark.skipif(not (SHARED / "tiktoken_cache").is_dir(), reason="needs ../shared/tiktoken_cache (offline GPT-2 BPE)")
def test_gpt2_tokenizer_round_trips_text(monkeypatch):
    """--tokenizer gpt2 is the GPT-2 BPE (r50k_base), loaded from TIKTOKEN_CACHE_DIR."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    tok = data.get_tokenizer("gpt2")
    text = "To be, or not to be: that is the question."
    assert tok.n_vocab == 50257 and tok.decode(tok.encode_ordinary(text)) == text
    assert data.token_dtype(tok.n_vocab) == np.uint16


def test_token_dtype_follows_vocabulary_size():
    """Token ids are stored in the smallest unsigned type that fits the vocabulary."""
    assert [data.token_dtype(v) for v in (256, 257, 65536, 100277)] == [np.uint8, np.uint16, np.uint16, np.uint32]


def test_split_is_deterministic_and_cached_as_memmap(tmp_path):
    """The last 10% of the tokens validate; loading twice gives the same split from the memmap cache."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefghij" * 100)
    first = data.load_dataset(str(corpus), "bytes", block_size=8)
    second = data.load_dataset(str(corpus), "bytes", block_size=8)
    assert isinstance(first.train, np.memmap) and first.train.dtype == np.uint8
    assert (len(first.train), len(first.val)) == (900, 100)
    assert np.array_equal(first.val, second.val) and bytes(first.val[:10]) == b"abcdefghij"


def test_batches_are_next_token_pairs_at_random_offsets():
    """y is x shifted by one; different generator states give different windows."""
    stream = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(stream, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x + 1, y)
    assert len(set(x[:, 0].tolist())) > 1


def test_default_corpus_is_embedded():
    """The default corpus ships with Python: no file, no download."""
    text = data.load_text("python-docs")
    assert len(text) > 100_000 and "assert" in text


# ---------------------------------------------------------------------------------------------------- train.py

def test_training_writes_metrics_and_a_weights_only_checkpoint(tmp_path, capsys):
    """A short run logs every step and every eval, and its checkpoint loads with weights_only=True."""
    out = tmp_path / "run"
    train.main(TINY + ["--nitp", "--max-iters", "6", "--eval-interval", "3", "--out-dir", str(out)])
    records = read_metrics(out)
    assert [r["step"] for r in records if not r.get("eval")] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in records if r.get("eval")]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(r["val_nitp"] is not None and r["erank"] >= 1 and -1 <= r["anisotropy"] <= 1 for r in evals)
    assert all(len(r["erank_by_layer"]) == 2 + 1 for r in evals)  # the embeddings and each of the 2 blocks
    assert all({"lm", "nitp", "loss"} <= set(r) for r in records if not r.get("eval"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["args"]["nitp"] and "versions" in ckpt and ckpt["nitp"] is not None
    assert "ms/iter" in capsys.readouterr().out


def test_moe_training_logs_the_aux_loss_and_expert_shares(tmp_path, capsys):
    """With --n-expert, every step logs the MoE aux loss apart, and every eval logs each expert's share."""
    out = tmp_path / "moe"
    train.main(TINY + ["--nitp", "--n-expert", "4", "--top-k", "2", "--max-iters", "2", "--eval-interval", "2",
                       "--out-dir", str(out)])
    records = read_metrics(out)
    assert all({"lm", "nitp", "moe_aux"} <= set(r) for r in records if not r.get("eval"))
    evals = [r for r in records if r.get("eval")]
    assert all(len(r["expert_share"]) == 1 and len(r["expert_share"][0]) == 4 and r["max_load"] >= 1 for r in evals)
    printed = capsys.readouterr().out
    assert "-A" in printed.splitlines()[0] and "busiest expert" in printed


@pytest.mark.parametrize("model_flags", [[], ["--n-expert", "4", "--top-k", "2"], ["--dtype", "float16"]],
                         ids=["dense", "moe", "fp16-with-scaler"])
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(model_flags, tmp_path, monkeypatch, capsys):
    """Ctrl-C saves a checkpoint; --resume continues with the same per-step losses and the same final
    weights, bit for bit, as a run that was never interrupted (NITP on; dense, MoE, and fp16 autocast, whose
    gradient scaler's state travels in the checkpoint)."""
    args = TINY + model_flags + ["--nitp", "--max-iters", "10", "--eval-interval", "4"]
    train.main(args + ["--out-dir", str(tmp_path / "a")])

    real_get_batch, calls = train.get_batch, []

    def interrupt_at_step_6(tokens, *rest):
        calls.append(1)
        if len(calls) == 2 + 6:  # 2 validation batches, then training batches
            signal.raise_signal(signal.SIGINT)
        return real_get_batch(tokens, *rest)

    monkeypatch.setattr(train, "get_batch", interrupt_at_step_6)
    with pytest.raises(SystemExit) as exit_info:
        train.main(args + ["--out-dir", str(tmp_path / "b")])
    assert exit_info.value.code == 130 and "--resume" in capsys.readouterr().out
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 6
    monkeypatch.setattr(train, "get_batch", real_get_batch)
    train.main(["--resume", "--out-dir", str(tmp_path / "b")])

    losses = [[r["loss"] for r in read_metrics(tmp_path / run) if not r.get("eval")] for run in "ab"]
    assert len(losses[0]) == 10 and losses[0] == losses[1]
    scalers = [torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["scaler"] for run in "ab"]
    assert scalers[0] == scalers[1] and (scalers[0] != {}) == ("float16" in model_flags)
    weights = [torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["model"] for run in "ab"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_compare_starts_both_runs_from_the_same_weights_and_batches(tmp_path, monkeypatch, capsys):
    """--compare: the NTP and NITP runs begin with identical backbone weights and see identical batches."""
    real_setup, real_get_batch = train.setup, train.get_batch
    initial_weights, batches = [], []

    def recording_setup(args, ckpt=None):
        run = real_setup(args, ckpt)
        if "seed" in Path(args.out_dir).name:  # the two training runs, not main()'s up-front check
            initial_weights.append({k: v.clone() for k, v in run["model"].state_dict().items()})
            batches.append([])
        return run

    def recording_get_batch(*a):
        x, y = real_get_batch(*a)
        if batches:
            batches[-1].append(x.clone())
        return x, y

    monkeypatch.setattr(train, "setup", recording_setup)
    monkeypatch.setattr(train, "get_batch", recording_get_batch)
    train.main(TINY + ["--compare", "--seeds", "1", "--max-iters", "4", "--eval-interval", "2",
                       "--out-dir", str(tmp_path)])
    ntp, nitp = initial_weights
    assert ntp.keys() == nitp.keys() and all(torch.equal(ntp[k], nitp[k]) for k in ntp)
    assert len(batches[0]) == 2 + 4 and all(torch.equal(a, b) for a, b in zip(*batches))
    printed = capsys.readouterr().out
    assert "step 2" in printed and "delta" in printed


def test_compare_with_seeds_writes_its_summary(tmp_path, capsys):
    """--compare --seeds 2 finishes, writes both runs' metrics per seed and a summary with mean ± std of each
    delta and whether it beats the seed-to-seed spread."""
    train.main(TINY + ["--compare", "--seeds", "2", "--max-iters", "3", "--eval-interval", "3",
                       "--out-dir", str(tmp_path)])
    for run in ("seed1337-ntp", "seed1337-nitp", "seed1338-ntp", "seed1338-nitp"):
        assert any(r.get("eval") for r in read_metrics(tmp_path / run))
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["seeds"] == [1337, 1338]
    assert {"val_lm", "erank", "anisotropy", "ms_per_iter"} <= set(result["summary"])
    erank = result["summary"]["erank"]
    assert erank["delta_std"] is not None and isinstance(erank["larger_than_spread"], bool)
    assert erank["delta_mean"] == pytest.approx(np.mean(np.array(erank["nitp"]) - np.array(erank["ntp"])))
    printed = capsys.readouterr().out
    assert "summary" in printed and "eff. rank: NITP higher in" in printed and "time:" in printed
    assert set(result["seconds"]) >= {"training steps", "evaluations", "probes"}
    # Only the comparison's own runs: no third, stray training run in OUT_DIR itself.
    made = {p.name for p in tmp_path.iterdir()}
    assert made - {"compare.png"} == {"seed1337-ntp", "seed1337-nitp", "seed1338-ntp", "seed1338-nitp", "compare.json"}


def test_the_summary_says_each_claim_in_plain_words():
    """A verdict names the direction and how many seeds agree, the size against the seed spread, and whether
    the paper's claim shows."""
    assert compare.verdict("eff. rank", "higher", [1.2, 1.3, 1.4], 1.3, 0.1, 0.26, "{:.2f}") == \
        "eff. rank: NITP higher in 3 of 3 seeds, +1.30 ± 0.10, 5.0× the seed spread: as the paper says"
    assert compare.verdict("anisotropy", "lower", [0.005, -0.003, -0.01], -0.003, 0.009, 0.009, "{:.4f}").endswith(
        "NITP lower in 2 of 3 seeds, -0.0030 ± 0.0090, within the seed spread (0.0090): not shown here")
    assert compare.verdict("val loss", "not worse", [0.01, 0.0, 0.02], 0.01, 0.01, 0.008, "{:.3f}").endswith(
        "1.2× the seed spread: NITP WORSE")
    assert compare.verdict("val loss", "not worse", [0.01, -0.02], -0.005, 0.02, 0.001, "{:.3f}").endswith(": NITP not worse")


def test_compare_runs_three_seeds_of_train_pys_own_defaults():
    """--compare is three seeds of the default run: the same model and schedule as `train.py --nitp`. Warm-up
    and evaluation follow --max-iters (a tenth each) unless given."""
    plain, compared = train.parse_args([]), train.parse_args(["--compare"])
    assert compared.seeds == 3
    # the pre-registered classroom setting (RESULTS.md, section 1)
    setting = {k: getattr(compared, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size",
                                                  "max_iters", "learning_rate", "warmup_iters", "data", "nitp_lambda")}
    assert setting == dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16, max_iters=1000,
                           learning_rate=2e-3, warmup_iters=100, data="python-docs", nitp_lambda=1.0)
    assert {k: v for k, v in vars(plain).items() if k != "compare"} == \
        {k: v for k, v in vars(compared).items() if k != "compare"}
    chosen = train.parse_args(["--max-iters=60", "--eval-interval", "7"])
    assert (chosen.warmup_iters, chosen.eval_interval) == (6, 7)
    assert train.parse_args(["--max-iters", "3"]).eval_interval == 1


def train_py(*argv: str, launcher: tuple[str, ...] = (), **popen_kw) -> subprocess.Popen:
    """`python [LAUNCHER] train.py ARGV` as a user starts it, one thread per process: the CPU may be shared."""
    env = {**os.environ, "NITP_CACHE_DIR": str(data.CACHE_DIR), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *launcher, "train.py", *argv], cwd=HERE, env=env, **popen_kw)


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    """SIGKILL in the middle of writing a checkpoint leaves the previous ckpt.pt whole: it loads, and --resume
    finishes the run."""
    out = tmp_path / "run"
    ckpt, partial = out / "ckpt.pt", out / "ckpt.pt.tmp"
    run = train_py(*TINY, "--max-iters", "1000", "--eval-interval", "1", "--out-dir", str(out),
                   stdout=subprocess.DEVNULL)
    try:  # freeze the run while it writes a checkpoint after the first one: then kill it
        deadline = time.monotonic() + 60
        while True:
            assert run.poll() is None and time.monotonic() < deadline, "never caught writing a second checkpoint"
            if ckpt.exists() and partial.exists():
                run.send_signal(signal.SIGSTOP)
                if partial.exists():
                    break
                run.send_signal(signal.SIGCONT)  # the write finished in between: try the next one
            time.sleep(0.001)
    finally:
        run.kill()
        run.wait()
    assert partial.exists()  # killed mid-write
    step = torch.load(ckpt, weights_only=True)["step"]
    resumed = train_py("--resume", "--max-iters", str(step + 2), "--out-dir", str(out), stdout=subprocess.DEVNULL)
    assert resumed.wait(timeout=60) == 0
    assert torch.load(ckpt, weights_only=True)["step"] == step + 2


def test_two_ddp_processes_follow_one_process_with_the_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo) of 4 sequences each logs the losses, within 1e-5 (float32 rounding),
    of one process of 8 sequences: the ranks split the same batches and average the gradients of the backbone
    and of the NITP head. With --grad-accum 2, and --nitp-start 2: the head has no gradient in the first steps."""
    args = [*TINY, "--nitp", "--nitp-start", "2", "--grad-accum", "2", "--max-iters", "4", "--eval-interval", "4"]
    with open(tmp_path / "torchrun.log", "w") as log:
        ddp = train_py(*args, "--out-dir", str(tmp_path / "ddp"), stdout=log, stderr=log,
                       launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
        train.main(args + ["--batch-size", "8", "--out-dir", str(tmp_path / "one")])  # meanwhile, in this process
        assert ddp.wait(timeout=120) == 0, (tmp_path / "torchrun.log").read_text()[-2000:]
    steps = [[r for r in read_metrics(tmp_path / run) if not r.get("eval")] for run in ("one", "ddp")]
    assert [r["step"] for r in steps[1]] == [1, 2, 3, 4]
    for single, ddp_step in zip(*steps):
        assert ddp_step.keys() == single.keys()
        for term in ("loss", "lm", "nitp", "grad_norm"):
            if term in single:
                assert ddp_step[term] == pytest.approx(single[term], abs=1e-5), (single["step"], term)


def poison_the_nitp_loss(loss, parts):
    parts["nitp"] = parts["nitp"] * float("nan")
    return parts["lm"] + parts["nitp"], parts


def poison_the_gradients(loss, parts):
    loss.register_hook(lambda grad: grad * float("inf"))  # the loss stays finite, its gradients do not
    return loss, parts


@pytest.mark.parametrize("poison,message", [(poison_the_nitp_loss, "step 6: the nitp loss is nan"),
                                            (poison_the_gradients, "step 6: the gradient norm is")])
def test_a_non_finite_loss_or_gradient_stops_the_run_and_keeps_the_checkpoint(poison, message, tmp_path, monkeypatch,
                                                                               capsys):
    """From step 6 on, a loss term is NaN or the gradients are infinite: the run exits with status 3 and one line
    naming the step and what went bad, and ckpt.pt (step 4) is left exactly as it was."""
    out = tmp_path / "run"
    real_training_loss, checkpoint_before = train.training_loss, []

    def poisoned_from_step_6(model, nitp, x, y, step):
        loss, parts = real_training_loss(model, nitp, x, y, step)
        if step + 1 < 6:  # `step` counts from 0 here, from 1 in the logs and messages
            return loss, parts
        checkpoint_before.append((out / "ckpt.pt").read_bytes())
        return poison(loss, parts)

    monkeypatch.setattr(train, "training_loss", poisoned_from_step_6)
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--nitp", "--max-iters", "10", "--eval-interval", "4", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 3
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert (out / "ckpt.pt").read_bytes() == checkpoint_before[0]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4


BAD_INPUTS = {
    "missing corpus": (["--data", "no/such/file.txt"], "not found"),
    "empty corpus": (["--data", "{empty}"], "empty"),
    "corpus not UTF-8": (["--data", "{latin1}"], "not UTF-8"),
    "corpus too short": (["--data", "{short}"], "--block-size"),
    "n_embd not divisible by n_head": (["--n-embd", "30", "--n-head", "4"], "divisible"),
    "target layer out of range": (["--nitp", "--n-layer", "2", "--nitp-layer", "2"], "0..1"),
    "negative lambda": (["--nitp", "--nitp-lambda", "-1"], "lambda"),
    "bad flag": (["--n-layers", "3"], "unrecognized"),
    "top-k above the number of experts": (["--n-expert", "4", "--top-k", "5"], "top_k"),
    "bad number": (["--max-iters", "0"], "--max-iters"),
    "resume without checkpoint": (["--resume"], "no checkpoint"),
    "resume with a damaged checkpoint": (["--resume", "--out-dir", "{damaged}"], "damaged"),
    "resume with a foreign file": (["--resume", "--out-dir", "{foreign}"], "not a version-1"),
    "resume with a truncated checkpoint": (["--resume", "--out-dir", "{truncated}"], "damaged"),
    "resume with parts of a checkpoint missing": (["--resume", "--out-dir", "{incomplete}"], "not a version-1"),
    "out-dir is a file": (["--out-dir", "{empty}"], "is a file"),
    "out-dir below a file": (["--out-dir", "{empty}/run"], "is a file"),
    "out-dir that cannot be created": (["--out-dir", "/proc/nitp-run"], "cannot write"),
    "infinite learning rate": (["--learning-rate", "inf"], "finite"),
    "NaN lambda": (["--nitp", "--nitp-lambda", "nan"], "finite"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_line_and_writes_nothing(case, tmp_path, capsys):
    """Each bad input: exit code 2, one line on stderr that says what to do, no traceback, no output dir."""
    argv, expected = BAD_INPUTS[case]
    files = {"empty": "", "latin1": "caf\xe9".encode("latin-1"), "short": "just a few words"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content.encode() if isinstance(content, str) else content)
    checkpoint = io.BytesIO()  # torch.save of a dict with tensors, as train.py writes; cut in half below
    torch.save({"format_version": train.CHECKPOINT_VERSION, "step": 1, "model": tiny_model().state_dict()}, checkpoint)
    checkpoints = {"damaged": b"PK\x03\x04 truncated", "foreign": {"some": "thing"},
                   "truncated": checkpoint.getvalue()[:len(checkpoint.getvalue()) // 2],
                   "incomplete": {"format_version": train.CHECKPOINT_VERSION, "step": 1}}
    for name, content in checkpoints.items():
        (tmp_path / name).mkdir()
        if isinstance(content, dict):
            torch.save(content, tmp_path / name / "ckpt.pt")
        else:
            (tmp_path / name / "ckpt.pt").write_bytes(content)
    argv = [a.format(**{n: str(tmp_path / n) for n in [*files, *checkpoints]}) for a in argv]
    out_dir = tmp_path / "out"
    if "--out-dir" not in argv:
        argv += ["--out-dir", str(out_dir)]
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err
    assert not out_dir.exists()


def test_every_float_flag_refuses_non_finite_numbers(capsys):
    float_flags = [a.option_strings[0] for a in train.make_parser()._actions if a.type is train.finite_float]
    assert len(float_flags) >= 6
    for flag in float_flags:
        for value in ("inf", "-inf", "nan"):
            with pytest.raises(SystemExit) as exit_info:
                train.parse_args([f"{flag}={value}"])
            assert exit_info.value.code == 2 and "finite" in capsys.readouterr().err, (flag, value)


def test_under_torchrun_a_user_error_is_printed_once(tmp_path, monkeypatch, capsys):
    """Every rank exits with status 2, but only rank 0 says why."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        for argv in (["--n-layers", "3"], ["--data", str(tmp_path / "missing.txt")]):
            with pytest.raises(SystemExit) as exit_info:
                train.main(argv + ["--out-dir", str(tmp_path / "out")])
            assert exit_info.value.code == 2 and bool(capsys.readouterr().err) == printed


def test_resume_with_another_number_of_processes_is_refused(tmp_path, capsys):
    """An exact continuation needs the world size the checkpoint was written with (the batches are sliced by
    rank): a mismatch is refused with the command that fits."""
    out = tmp_path / "run"
    train.main(TINY + ["--max-iters", "2", "--out-dir", str(out)])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["world_size"] == 1
    ckpt["world_size"] = 2
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--nproc_per_node=2" in err and len(err.strip().splitlines()) == 1


def test_resume_with_a_different_model_shape_is_refused(tmp_path, capsys):
    """A checkpoint from another config cannot be resumed with conflicting flags; the error says which flag."""
    out = str(tmp_path / "run")
    train.main(TINY + ["--max-iters", "2", "--out-dir", out])
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", "--out-dir", out, "--n-embd", "64"])
    assert exit_info.value.code == 2 and "--n-embd 32" in capsys.readouterr().err
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before


def test_resume_with_a_corrupt_generator_state_is_refused(tmp_path, capsys):
    """A checkpoint whose batch-generator state is garbage gives the one-line error, not a traceback."""
    out = tmp_path / "run"
    train.main(TINY + ["--max-iters", "2", "--out-dir", str(out)])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["rng"]["batches"] = torch.zeros(3, dtype=torch.uint8)
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "does not fit" in err and len(err.strip().splitlines()) == 1


def test_unavailable_standard_encoding_names_tiktoken_cache_dir(tmp_path, monkeypatch):
    """Offline, a standard encoding fails with a message that says how to make it work."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    def offline(url):
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    with pytest.raises(data.DataError, match="TIKTOKEN_CACHE_DIR"):
        data.get_tokenizer("cl100k_base")


def test_the_command_line_reports_errors_without_a_traceback(tmp_path):
    """As a user sees it: `python train.py --data missing.txt` prints one line and exits non-zero."""
    result = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "missing.txt"),
                             "--out-dir", str(tmp_path / "out")], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent, env={**os.environ, "NITP_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not found" in result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- devices and precision

CUDA, MPS, CPU = torch.device("cuda"), torch.device("mps"), torch.device("cpu")


def gpu_of_capability(monkeypatch, capability: tuple[int, int]) -> None:
    """Stand in for a CUDA GPU of this compute capability: pick_dtype and check_compile ask only this."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("device,capability,expected", [
    (CUDA, (9, 0), torch.bfloat16), (CUDA, (8, 0), torch.bfloat16),  # H100, A100: native bf16
    (CUDA, (7, 5), torch.float16), (CUDA, (7, 0), torch.float16),    # T4, V100: bf16 only emulated
    (CPU, None, torch.float32), (MPS, None, torch.float32)])
def test_auto_precision_follows_the_device(device, capability, expected, monkeypatch):
    gpu_of_capability(monkeypatch, capability)
    assert devices.pick_dtype("auto", device) == expected


def test_a_precision_the_device_cannot_run_is_refused(monkeypatch):
    gpu_of_capability(monkeypatch, (7, 5))
    with pytest.raises(ValueError, match="compute capability 7.5.*float16"):
        devices.pick_dtype("bfloat16", CUDA)
    assert devices.pick_dtype("float16", CUDA) == torch.float16 and devices.pick_dtype("float32", CUDA) == torch.float32
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(ValueError, match="MPS.*float32"):
            devices.pick_dtype(dtype, MPS)
    assert [devices.pick_dtype(d, CPU) for d in ("bfloat16", "float16")] == [torch.bfloat16, torch.float16]


def test_compile_is_refused_where_it_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="MPS"):
        devices.check_compile(MPS)
    gpu_of_capability(monkeypatch, (6, 1))  # a GTX 10xx: below Triton's minimum
    with pytest.raises(ValueError, match="7.0"):
        devices.check_compile(CUDA)
    gpu_of_capability(monkeypatch, (7, 5))
    devices.check_compile(CUDA)
    devices.check_compile(CPU)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_nitp_with_moe_trains_under_autocast_with_the_router_in_fp32(dtype, tmp_path, capsys):
    """CPU autocast stands in for the GPU's: matmuls run in the low precision, the router stays in fp32, and a
    few training steps of NITP on an MoE model give finite losses."""
    model = tiny_model(n_expert=4, top_k=2)
    router_logits = []
    model.blocks[1].mlp.register_forward_hook(lambda m, i, o: router_logits.append(m.route(i[0].flatten(0, 1))[0]))
    with devices.autocast_for(CPU, dtype):
        out = model(tokens(), tokens(seed=1))
    assert out.logits.dtype == dtype and router_logits[0].dtype == torch.float32
    name = str(dtype).removeprefix("torch.")
    train.main(TINY + ["--nitp", "--n-expert", "4", "--top-k", "2", "--dtype", name, "--max-iters", "4",
                       "--out-dir", str(tmp_path)])
    steps = [r for r in read_metrics(tmp_path) if not r.get("eval")]
    assert len(steps) == 4 and all(np.isfinite([r["lm"], r["nitp"], r["moe_aux"]]).all() for r in steps)
    # fp16's scaler starts at 2^16 and may skip the first steps while it finds its scale; bf16 has no scaler.
    assert all(r.get("skipped") or np.isfinite(r["grad_norm"]) for r in steps)
    assert not any(r.get("skipped") for r in steps) or dtype == torch.float16
    assert name in capsys.readouterr().out.splitlines()[0]


def poison_once_at_step_6(monkeypatch, poison) -> None:
    real_training_loss = train.training_loss

    def poisoned(model, nitp, x, y, step):
        loss, parts = real_training_loss(model, nitp, x, y, step)
        return poison(loss, parts) if step + 1 == 6 else (loss, parts)

    monkeypatch.setattr(train, "training_loss", poisoned)


def test_under_fp16_inf_gradients_skip_the_step_and_the_run_goes_on(tmp_path, monkeypatch):
    """With --dtype float16 the gradient scaler owns overflow: step 6's inf gradients make it skip that update
    and halve its scale, the run finishes, and metrics.jsonl marks the step as skipped. (The scaler may also
    skip a first step or two while it finds its scale: the same ones in a run without the poison.)"""
    args = TINY + ["--nitp", "--dtype", "float16", "--max-iters", "8", "--eval-interval", "8"]
    train.main(args + ["--out-dir", str(tmp_path / "clean")])
    poison_once_at_step_6(monkeypatch, poison_the_gradients)
    train.main(args + ["--out-dir", str(tmp_path / "poisoned")])
    skipped = [{r["step"] for r in read_metrics(tmp_path / run) if r.get("skipped")} for run in ("clean", "poisoned")]
    assert 6 not in skipped[0] and skipped[1] == skipped[0] | {6}
    steps = [r for r in read_metrics(tmp_path / "poisoned") if not r.get("eval")]
    assert len(steps) == 8 and steps[5]["grad_norm"] is None
    scales = [torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["scaler"]["scale"] for run in ("clean", "poisoned")]
    assert scales[1] == scales[0] / 2


def test_under_fp16_a_nan_loss_still_stops_the_run(tmp_path, monkeypatch, capsys):
    poison_once_at_step_6(monkeypatch, poison_the_nitp_loss)
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--nitp", "--dtype", "float16", "--max-iters", "8", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 3 and "step 6: the nitp loss is nan" in capsys.readouterr().err


def test_metrics_give_the_same_numbers_for_states_in_any_dtype_on_any_device():
    """Effective rank and anisotropy compute in fp32 on the CPU, whatever the states' dtype and device."""
    states = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) @ torch.randn(16, 16)
    devices = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rounded = states.to(dtype)
        expected = (effective_rank(rounded.float()), anisotropy(rounded.float()))
        for device in devices:
            assert (effective_rank(rounded.to(device)), anisotropy(rounded.to(device))) == expected, (dtype, device)


def test_a_training_step_waits_for_the_device_only_once(tmp_path, monkeypatch):
    """On a GPU, reading a tensor's value waits for all queued work. train.py reads one value per step, in
    sync_step (the NaN/inf guard); the loss terms stay on the device until a log line needs them, and are
    then read in one go (flush)."""
    reads = []
    for method in ("item", "tolist"):
        def reading(self, *args, real=getattr(torch.Tensor, method)):
            caller = sys._getframe(1).f_code
            if caller.co_filename == train.__file__:
                reads.append(caller.co_name)
            return real(self, *args)
        monkeypatch.setattr(torch.Tensor, method, reading)
    train.main(TINY + ["--nitp", "--max-iters", "12", "--log-interval", "4", "--eval-interval", "6",
                       "--out-dir", str(tmp_path)])
    reads = Counter(reads)
    assert reads.pop("sync_step") == 12
    assert reads.pop("flush") == 4          # steps 4, 6 (eval), 8, 12
    assert reads.pop("train") == 1          # the sample, after training
    assert set(reads) <= {"evaluate"}       # the evaluations (steps 0, 6, 12) read what they print
    assert [r["step"] for r in read_metrics(tmp_path) if not r.get("eval")] == list(range(1, 13))


def test_sampling_never_picks_a_token_outside_the_top_k():
    """generate samples on the CPU from the masked distribution: with top_k=1 it is greedy decoding."""
    model = tiny_model()
    torch.manual_seed(0)
    sampled = model.generate(tokens(B=2, T=3), max_new_tokens=8, top_k=1)
    greedy = tokens(B=2, T=3)
    for _ in range(8):
        greedy = torch.cat([greedy, model(greedy).logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(sampled, greedy)


# ---------------------------------------------------------------------------------------------------- the speed report

def test_the_speed_report_refuses_flags_it_would_ignore(monkeypatch, capsys):
    for flag in (["--compile"], ["--grad-accum", "2"], ["--n-expert", "4"]):
        monkeypatch.setattr(sys, "argv", ["bench.py", *TINY, *flag])
        with pytest.raises(SystemExit) as exit_info:
            bench.main()
        assert exit_info.value.code == 2 and flag[0] in capsys.readouterr().err


def test_flops_per_token_add_the_head_and_count_only_the_k_experts_a_token_uses():
    """bench.py: the NITP head adds 6 · 12d² per token; top-2 of 8 experts costs one more expert per MoE layer
    (4 layers, the first dense: 3 MoE layers) than top-1, whatever E is."""
    d, dense = 16, tiny_model()
    assert bench.flops_per_token(dense, tiny_nitp(d=d)) - bench.flops_per_token(dense, None) == 6 * 12 * d * d
    k1, k2 = tiny_model(n_expert=8, top_k=1), tiny_model(n_expert=8, top_k=2)
    expert = sum(p.numel() for p in k1.blocks[-1].mlp.experts[0].parameters())
    assert bench.flops_per_token(k2, None) - bench.flops_per_token(k1, None) == 6 * 3 * expert
    assert bench.flops_per_token(dense, None) == 6 * (dense.num_params() - 16 * 16) + 12 * 4 * 16 * 16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_speed_report_prints_one_table_with_the_nitp_overhead(dtype, monkeypatch, capsys):
    """bench.py on the CPU, in fp32 and (as a stand-in for a GPU's autocast) bf16, with the op profile."""
    peaks = []
    real_peak = bench.matmul_peak
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: peaks.append(dtype) or real_peak(device, dtype, n=64))
    monkeypatch.setattr(sys, "argv", ["bench.py", *TINY, "--rounds", "2", "--steps-per-round", "1", "--dtype", dtype,
                                      "--profile"])
    bench.main()
    printed = capsys.readouterr().out
    assert peaks == [getattr(torch, dtype)] * 2  # the peak GEMM runs in the training dtype, every round
    assert "matmul peak" in printed and "NITP overhead: analytic" in printed and dtype in printed
    assert "where dense NTP's step time goes" in printed
    assert all(name in printed for name in ("NTP (dense)", "NITP (dense)", "NTP, MoE E=8 k=2", "NITP, MoE E=8 k=2"))
