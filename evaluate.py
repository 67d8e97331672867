"""Evaluation: the validation loss, and what NITP claims to change, the geometry of the hidden states.

train.py evaluates every --eval-interval steps on the same fixed validation batches, in every run, so that the
NTP and NITP runs of compare.py are measured on exactly the same tokens.
"""
import numpy as np
import torch

from data import get_batch
from devices import to_device
from model import GPT
from nitp import NITP, anisotropy, effective_rank


def validation_batches(tokens: np.ndarray, batch_size: int, block_size: int, n_batches: int,
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same validation batches at every evaluation and in every run: their generator has its own seed."""
    rng = torch.Generator().manual_seed(0)
    return [tuple(to_device(t, device) for t in get_batch(tokens, batch_size, block_size, rng))
            for _ in range(n_batches)]


@torch.no_grad()
def evaluate(model: GPT, nitp: NITP | None, val_batches, autocast) -> dict:
    """Pure LM validation loss, NITP loss, and the geometry of the hidden states.

    The metrics use the states of the first, fixed validation batch (B·T states): `erank` and `anisotropy` the
    final hidden states (after ln_f, the LM head's input: the vector NITP trains), `erank_by_layer` the output
    of every block, [0] being the embeddings, to see where in the depth NITP acts."""
    model.eval()
    lm_losses, nitp_losses, expert_shares = [], [], []
    for i, (x, y) in enumerate(val_batches):
        with autocast:
            out = model(x, y)
            lm_losses.append(out.loss)
            if nitp is not None:
                nitp_losses.append(nitp(out.hidden, out.block_outputs[nitp.layer]))
        if out.expert_share is not None:
            expert_shares.append(out.expert_share)  # (n_moe_layers, E)
        if i == 0:
            d = out.hidden.size(-1)
            states = out.hidden.reshape(-1, d)  # (B*T, d)
            metrics = {"erank": effective_rank(states), "anisotropy": anisotropy(states),
                       "erank_by_layer": [effective_rank(z.reshape(-1, d)) for z in out.block_outputs]}
    model.train()
    if expert_shares:  # each expert's share of the routed slots, per MoE layer; ideal is 1/E each
        share = torch.stack(expert_shares).mean(dim=0)  # (n_moe_layers, E)
        metrics["expert_share"] = share.tolist()
        metrics["max_load"] = (share.max() * share.size(1)).item()  # busiest expert / ideal: 1 = balanced
    return {"val_lm": torch.stack(lm_losses).mean().item(),
            "val_nitp": torch.stack(nitp_losses).mean().item() if nitp is not None else None, **metrics}


def print_evaluation(record: dict) -> None:
    val_nitp = f"{record['val_nitp']:.4f}" if record["val_nitp"] is not None else "-"
    print(f"eval step {record['step']:5d} | val lm {record['val_lm']:.4f} | val nitp {val_nitp} | "
          f"erank {record['erank']:.1f} | anisotropy {record['anisotropy']:.3f}")
    for layer, share in enumerate(record.get("expert_share", [])):
        print(f"  MoE layer {layer + 1}: expert shares " + " ".join(f"{100 * s:.0f}%" for s in share))
    if "max_load" in record:
        print(f"  routing balance: busiest expert gets {record['max_load']:.2f}x its fair share (1.00 = even)")


def model_size(model: GPT) -> str:
    """Parameters, named as the paper names its models: total, and active per token for MoE ("1.9B-A0.3B")."""
    def short(n: int) -> str:
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    total, active = model.num_params(), model.num_params(active=True)
    return short(total) if total == active else f"{short(total)}-A{short(active)}"
