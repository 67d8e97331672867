"""Evaluation: the validation loss, and what NITP claims to change, the geometry of the hidden states.

train.py evaluates every --eval-interval steps on the same fixed validation batches (--eval-iters of them), in
every run, so that the NTP and NITP runs of compare.py are measured on exactly the same tokens.
"""
import numpy as np
import torch
import torch.nn.functional as F

from data import get_batch
from devices import to_device
from model import GPT
from nitp import NITP, Geometry


def validation_batches(tokens: np.ndarray, batch_size: int, block_size: int, n_batches: int,
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same validation batches at every evaluation and in every run: their generator has its own seed."""
    rng = torch.Generator().manual_seed(0)
    return [tuple(to_device(t, device) for t in get_batch(tokens, batch_size, block_size, rng))
            for _ in range(n_batches)]


@torch.no_grad()
def evaluate(model: GPT, nitp: NITP | None, val_batches, autocast) -> dict:
    """Pure LM validation loss, NITP loss, and the geometry of the hidden states.

    The geometry is measured on the states of every validation batch (geometry_states of them, in
    geometry_windows windows; anisotropy pairs states of different windows only): `erank` and `anisotropy` of the
    final hidden states (after ln_f, the LM head's input: the vector NITP trains), `erank_by_layer` of the output
    of every block, [0] being the embeddings, to see where in the depth NITP acts."""
    model.eval()
    lm_losses, nitp_losses, expert_shares = [], [], []
    final, by_layer = Geometry(), None
    for x, y in val_batches:
        with autocast:
            out = model(x, y)
            lm_losses.append(out.loss)
            if nitp is not None:
                nitp_losses.append(nitp(out.hidden, out.block_outputs[nitp.layer]))
        if out.expert_share is not None:
            expert_shares.append(out.expert_share)  # (n_moe_layers, E)
        final.add(out.hidden)                        # (B, T, d): B windows of T states
        by_layer = by_layer or [Geometry() for _ in out.block_outputs]
        for geometry, z in zip(by_layer, out.block_outputs):
            geometry.add(z)
    model.train()
    metrics = {"erank": final.effective_rank(), "anisotropy": final.anisotropy(),
               "erank_by_layer": [geometry.effective_rank() for geometry in by_layer],
               "geometry_states": final.n, "geometry_windows": final.windows}
    if expert_shares:  # each expert's share of the routed slots, per MoE layer; ideal is 1/E each
        share = torch.stack(expert_shares).mean(dim=0)  # (n_moe_layers, E)
        metrics["expert_share"] = share.tolist()
        metrics["max_load"] = (share.max() * share.size(1)).item()  # busiest expert / ideal: 1 = balanced
    return {"val_lm": torch.stack(lm_losses).mean().item(),
            "val_nitp": torch.stack(nitp_losses).mean().item() if nitp is not None else None, **metrics}


def nitp_diagnostics(model: GPT, nitp: NITP, x: torch.Tensor, y: torch.Tensor, autocast) -> dict:
    """Is NITP alive, or inert, or collapsing? Measured on one fixed validation batch at evaluation time only,
    so that a training step pays nothing for it:
      nitp_cos                  mean cos(P(h_t), z_{t+1}): near 0 if the head predicts nothing
      pred_norm, target_norm    mean L2 norms of P(h_t) and of z_{t+1}: a collapse shows as a norm going to 0
      grad_lm, grad_nitp        norms of the backbone's gradients of L_NTP and of λ·L_NITP
      grad_nitp_share           grad_nitp / (grad_lm + grad_nitp): NITP's share of what moves the backbone
      grad_cos                  cosine between those two gradients: do the losses pull the same way?
    The gradients come from torch.autograd.grad: the .grad that the optimizer reads is not touched."""
    was_training = model.training
    model.eval()
    backbone = list(model.parameters())
    with torch.enable_grad(), autocast:
        out = model(x, y)
        h, z = out.hidden, out.block_outputs[nitp.layer]            # (B, T, d) each
        pred, target = nitp.pairs(h, z)                             # (B, T-s, d) each: P(h_t), z_{t+s}
        weighted_nitp = nitp.config.lam * nitp(h, z)
    grads = [torch.autograd.grad(loss, backbone, retain_graph=True, allow_unused=True)
             for loss in (out.loss, weighted_nitp)]
    model.train(was_training)
    g_lm, g_nitp = (torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                               for g, p in zip(gs, backbone)]) for gs in grads)  # (n_params,) each
    norm_lm, norm_nitp = g_lm.norm().item(), g_nitp.norm().item()
    return {"nitp_cos": F.cosine_similarity(pred, target, dim=-1).mean().item(),
            "pred_norm": pred.norm(dim=-1).mean().item(), "target_norm": target.norm(dim=-1).mean().item(),
            "grad_lm": norm_lm, "grad_nitp": norm_nitp,
            "grad_nitp_share": norm_nitp / (norm_lm + norm_nitp) if norm_lm + norm_nitp > 0 else 0.0,
            "grad_cos": F.cosine_similarity(g_lm, g_nitp, dim=0).item()}


def print_evaluation(record: dict) -> None:
    val_nitp = f"{record['val_nitp']:.4f}" if record["val_nitp"] is not None else "-"
    print(f"eval step {record['step']:5d} | val lm {record['val_lm']:.4f} | val nitp {val_nitp} | "
          f"erank {record['erank']:.1f} | anisotropy {record['anisotropy']:.3f}")
    for layer, share in enumerate(record.get("expert_share", [])):
        print(f"  MoE layer {layer + 1}: expert shares " + " ".join(f"{100 * s:.0f}%" for s in share))
    if "max_load" in record:
        print(f"  routing balance: busiest expert gets {record['max_load']:.2f}x its fair share (1.00 = even)")
    if "nitp_cos" in record:
        print(f"  NITP: cos(P(h), z) {record['nitp_cos']:.3f} | |P(h)| {record['pred_norm']:.2f} | "
              f"|z| {record['target_norm']:.2f} | share of the backbone gradient {record['grad_nitp_share']:.1%} "
              f"(cos to the LM's {record['grad_cos']:+.2f})")


def flops_per_token(model: GPT, nitp: NITP | None) -> float:
    """Training FLOPs per token, counted as in the PaLM paper: 6 per weight a token passes through (2 forward,
    4 backward), counting k of the E routed experts and the tied LM head but not the embedding lookups, plus
    attention, 12 · n_layer · block_size · d. The NITP head adds 6 · (its weights), 6 · 12d² for SwiGLU."""
    c = model.config
    weights = model.num_params(active=True) - model.wpe.weight.numel()
    head = sum(p.numel() for p in nitp.parameters()) if nitp else 0
    return 6 * (weights + head) + 12 * c.n_layer * c.block_size * c.n_embd


def model_size(model: GPT) -> str:
    """Parameters, named as the paper names its models: total, and active per token for MoE ("1.9B-A0.3B")."""
    def short(n: int) -> str:
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    total, active = model.num_params(), model.num_params(active=True)
    return short(total) if total == active else f"{short(total)}-A{short(active)}"
