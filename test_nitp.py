"""Tests of the method (nitp.py): the loss, its shift and stop-gradient, the head, the ablation switches, the metrics."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import data
import machinery
import train
from conftest import TINY, exact, read_metrics, same, tiny_model, tiny_nitp, tokens
from nitp import Geometry, NITPConfig, TrainingLoss, anisotropy, default_layer, diagnostics, effective_rank

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
        loss, _ = TrainingLoss(model, nitp)(idx, targets)
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
    loss, parts = TrainingLoss(model, nitp)(tokens(), tokens(seed=1))
    loss.backward()
    assert set(parts) == {"lm", "nitp"}
    assert sorted(calls) == sorted(["wte", "block0", "block1", "block2", "block3"])


def test_the_dense_model_compiles_to_one_graph_with_every_block_output(device):
    """--compile compiles the model; the dense forward pass, returning every block's output, has no graph break."""
    if device == "mps":
        pytest.skip("--compile is refused on MPS")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(tiny_model().to(device))(tokens().to(device), tokens(seed=1).to(device))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_total_loss_is_ntp_plus_lambda_times_nitp():
    """The training loss is L_NTP + λ·L_NITP, with the parts reported separately."""
    loss, parts = TrainingLoss(tiny_model(), tiny_nitp(lam=0.7))(tokens(), tokens(seed=1))
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
    _, parts = TrainingLoss(model, nitp)(tokens(), tokens(seed=1))
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
        loss, parts = TrainingLoss(model, nitp)(idx, targets, step=step)
        loss.backward()
        assert ("nitp" in parts) == expect_nitp
        assert (nitp.head.down.weight.grad is not None) == expect_nitp


def test_ablation_flags_reach_the_nitp_config(tmp_path):
    """Each --nitp-* flag of train.py sets exactly its field of NITPConfig."""
    args = machinery.parse_args(TINY + ["--nitp", "--nitp-lambda", "0.5", "--nitp-layer", "0", "--nitp-shift", "0",
                                    "--nitp-no-stopgrad", "--nitp-head", "linear", "--nitp-loss", "mse",
                                    "--nitp-start", "7", "--out-dir", str(tmp_path)])
    config = train.setup(args).nitp.config
    assert config == NITPConfig(lam=0.5, layer=0, shift=0, stopgrad=False, head="linear", loss="mse", start=7)
    assert train.setup(machinery.parse_args(TINY + ["--nitp"])).nitp.config == NITPConfig()


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


def test_anisotropy_leaves_out_pairs_within_a_window():
    """Within each window the states are one direction, across windows they are orthogonal: pairs across windows
    average 0, while every pair of distinct states (the (N, d) reading) would average well above it."""
    windows = torch.eye(4).repeat_interleave(8, dim=0).view(4, 8, 4) * 3.0   # (W=4, T=8, d=4)
    assert anisotropy(windows) == pytest.approx(0.0, abs=1e-12)
    assert anisotropy(windows.reshape(32, 4)) == pytest.approx((8 * 7 * 4) / (32 * 31), abs=1e-12)


def test_geometry_added_batch_by_batch_equals_geometry_of_all_states_at_once():
    """The evaluation adds one validation batch at a time; the sums it keeps give the numbers of all the states
    together, also where the states have a large common mean (as the final hidden states do)."""
    g = torch.Generator().manual_seed(0)
    states = torch.randn(12, 16, 8, generator=g) @ torch.randn(8, 8, generator=g) + 50 * torch.randn(8, generator=g)
    whole = Geometry().add(states)
    pieces = Geometry()
    for batch in states.split(5):                                          # windows 5 + 5 + 2
        pieces.add(batch)
    assert (pieces.n, pieces.windows) == (whole.n, whole.windows) == (192, 12)
    assert pieces.effective_rank() == pytest.approx(whole.effective_rank(), rel=1e-9)
    assert pieces.anisotropy() == pytest.approx(whole.anisotropy(), rel=1e-9)
    flat = states.reshape(-1, 8).double()                                  # the textbook formulas, directly
    centred = flat - flat.mean(dim=0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / (len(flat) - 1))
    p = eigenvalues / eigenvalues.sum()
    assert whole.effective_rank() == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-9)
    u = torch.nn.functional.normalize(states.double(), dim=-1)
    cosines = torch.einsum("atd,bsd->atbs", u, u)                          # every pair, windows a and b
    across = ~torch.eye(12, dtype=torch.bool)[:, None, :, None].expand_as(cosines)
    assert whole.anisotropy() == pytest.approx(cosines[across].mean().item(), rel=1e-9)


def test_the_last_evaluation_reads_the_whole_held_out_text(device, tmp_path):
    """During training an evaluation reads --eval-iters batches of windows; the last reads every validation token
    once (loss and geometry alike), and the records say which and how many."""
    train.main(TINY + ["--max-iters", "2", "--eval-interval", "1", "--eval-iters", "3", "--device", device,
                       "--out-dir", str(tmp_path)])
    during, *_, last = [r for r in read_metrics(tmp_path) if r.get("eval")]
    assert (during["whole_split"], during["geometry_states"], during["geometry_windows"]) == (False, 3 * 4 * 16, 3 * 4)
    assert during["val_targets"] == 3 * 4 * 16
    n_val = len(data.load_dataset("python-docs", data.get_tokenizer("bytes"), 16).val)
    assert last["whole_split"] and last["val_targets"] == last["geometry_states"] == n_val - 1
    assert last["geometry_windows"] == -(-(n_val - 1) // 16)  # full windows of 16, and one shorter for the rest


# ---------------------------------------------------------------------------------------------------- padding and documents

def test_a_pair_mask_keeps_only_the_pairs_it_marks():
    """With a mask, L_NITP is the mean over the marked pairs (t, t+1) only; what the unmarked pairs hold does not
    matter; with no pair marked the loss is 0, not NaN."""
    nitp = tiny_nitp()
    h, z = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])  # the first row is padded after 4 tokens
    mask = attention[:, :-1].bool() & attention[:, 1:].bool()          # (2, 5): pairs of two real tokens
    distances = nitp.distances(h, z)
    assert nitp(h, z, mask).item() == pytest.approx(distances[mask].mean().item(), rel=1e-6)
    padded = z.clone()
    padded[0, 4:] = 1e3  # whatever the pads hold
    assert nitp(h, padded, mask).item() == pytest.approx(nitp(h, z, mask).item(), rel=1e-6)
    assert nitp(h, z, torch.zeros_like(mask)).item() == 0.0
    assert nitp(h, z, torch.ones_like(mask)).item() == pytest.approx(nitp(h, z).item(), rel=1e-6)


def test_document_ids_give_the_mask_of_pairs_within_one_document():
    """The docstring's recipe for packed documents, through NITP itself: with mask = doc[:, :-1] == doc[:, 1:] the
    loss is the mean over the pairs inside one document, and whatever stands across a boundary changes nothing."""
    doc = torch.tensor([[0, 0, 0, 1, 1, 2]])
    mask = doc[:, :-1] == doc[:, 1:]  # (1, 5): pairs (t, t+1) of one document
    assert mask.tolist() == [[True, True, False, True, False]]
    nitp = tiny_nitp(d=16)
    h, z = torch.randn(1, 6, 16), torch.randn(1, 6, 16)
    inside = [0, 1, 3]  # the pairs (0, 1), (1, 2), (3, 4)
    assert nitp(h, z, mask).item() == pytest.approx(nitp.distances(h, z)[0, inside].mean().item(), rel=1e-6)
    crossing = h.clone()
    crossing[0, [2, 4]] = 1e3  # h at the last position of documents 0 and 1: its pair crosses a boundary
    assert nitp(crossing, z, mask).item() == pytest.approx(nitp(h, z, mask).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- is NITP alive?

def test_lambda_zero_trains_the_same_backbone_as_ntp_bit_for_bit(device, tmp_path):
    """With λ = 0 the head is there, but its loss adds exactly nothing to the backbone's gradient: after a few
    steps, the backbone's weights equal the NTP run's to the last bit. (Without clipping: the global gradient
    norm then sums a longer list of per-tensor norms, the head's zeros included, which can round the clip
    factor differently in its last bit.)"""
    for name, extra in (("ntp", []), ("zero", ["--nitp", "--nitp-lambda", "0"])):
        train.main(TINY + exact(device) + extra + ["--grad-clip", "0", "--max-iters", "5", "--out-dir", str(tmp_path / name)])
    weights = [torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"] for name in ("ntp", "zero")]
    assert all(same(weights[0][k], weights[1][k], device) for k in weights[0])


def test_the_head_is_in_the_optimizer_and_learns_from_the_first_step(device, tmp_path):
    run = train.setup(machinery.parse_args(TINY + ["--nitp", "--device", device, "--out-dir", str(tmp_path)]))
    optimized = {id(p) for p in run.params}
    assert all(id(p) in optimized for p in run.nitp.parameters())
    before = [p.detach().clone() for p in run.nitp.parameters()]
    train.train_step(run, train.training_loss(run))
    assert all(not torch.equal(a, b) for a, b in zip(before, run.nitp.parameters()))


def test_nitps_part_of_the_backbone_gradient_scales_linearly_with_lambda(device):
    """nitp.diagnostics: the backbone gradient of λ·L_NITP is λ times that of L_NITP, and the LM's
    part does not depend on λ."""
    model, x, y = tiny_model().to(device), tokens().to(device), tokens(seed=1).to(device)
    found = {lam: diagnostics(model, tiny_nitp(lam=lam).to(device), x, y, contextlib.nullcontext())
             for lam in (0.5, 1.0, 2.0)}
    assert found[2.0]["grad_nitp"] == pytest.approx(2 * found[1.0]["grad_nitp"], rel=1e-5)
    assert found[0.5]["grad_nitp"] == pytest.approx(0.5 * found[1.0]["grad_nitp"], rel=1e-5)
    assert found[0.5]["grad_lm"] == found[2.0]["grad_lm"] and found[1.0]["grad_cos"] == pytest.approx(found[2.0]["grad_cos"])
    assert all(p.grad is None for p in model.parameters())  # measured without touching .grad


def test_the_diagnostics_are_logged_at_each_evaluation_and_match_the_loss(device, tmp_path):
    """Each evaluation of a NITP run logs the diagnostics; with the cosine loss, nitp_cos is 1 − L_NITP on the
    first batch of the evaluations during training (the last evaluation reads the same batch for them)."""
    train.main(TINY + ["--nitp", "--device", device, "--max-iters", "4", "--eval-interval", "2", "--out-dir", str(tmp_path)])
    evals = [r for r in read_metrics(tmp_path) if r.get("eval")]
    keys = {"nitp_cos", "pred_norm", "target_norm", "grad_lm", "grad_nitp", "grad_nitp_share", "grad_cos"}
    assert all(keys <= set(r) and 0 <= r["grad_nitp_share"] <= 1 for r in evals)
    run = train.setup(machinery.parse_args(TINY + ["--nitp", "--device", device, "--resume", "--out-dir", str(tmp_path)]),
                      machinery.load(str(tmp_path)))
    x, y = train.validation_batches(run.dataset.val, 4, 16, run.device, 2)[0]  # TINY: --eval-iters 2
    with torch.no_grad(), run.precision.autocast:  # as the evaluation ran
        out = run.model(x, y)
        loss = run.nitp(out.hidden, out.block_outputs[run.nitp.layer]).item()
    assert evals[-1]["nitp_cos"] == pytest.approx(1 - loss, abs=1e-5)


def test_the_logged_losses_equal_a_recompute_by_hand(device, tmp_path):
    """Step 1's logged loss, lm and nitp equal the training loss recomputed on the same first batch with the initial
    weights, and loss = lm + λ·nitp."""
    command = TINY + ["--nitp", "--nitp-lambda", "0.7", "--device", device, "--max-iters", "1", "--out-dir", str(tmp_path)]
    args = machinery.parse_args(command)
    run = train.setup(args)
    x, y = train.get_batch(run.dataset.train, 4, 16, torch.Generator().manual_seed(args.seed))
    with torch.no_grad(), run.precision.autocast:  # as the training step runs
        loss, parts = TrainingLoss(run.model, run.nitp)(x.to(run.device), y.to(run.device))
    train.main(command)
    logged = [r for r in read_metrics(tmp_path) if not r.get("eval")][0]
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert (logged["lm"], logged["nitp"]) == pytest.approx((parts["lm"].item(), parts["nitp"].item()), rel=1e-6)
    assert logged["loss"] == pytest.approx(logged["lm"] + 0.7 * logged["nitp"], rel=1e-6)
