"""NITP on a Hugging Face `transformers` causal LM: GPT-2 and Llama, built from a config, no download.

The recipe, for any training loop (nanoGPT's, the HF Trainer's, yours):
  1. From ONE forward pass take h = the LM head's input (the final hidden states, after the final norm)
     and z = the output of block k (k ≈ 20% of the depth; 0 would be the embeddings).
     In HF: model(x, labels=x, output_hidden_states=True) gives both: h = hidden_states[-1], z = hidden_states[k].
     In nanoGPT: h = self.transformer.ln_f(x) (what lm_head reads), z = x right after block k in the loop.
  2. loss = lm_loss + lam * nitp(h, z)   (nitp.py: a SwiGLU head P and mean_t 1 - cos(P(h_t), sg(z_{t+1}))).
  3. Optimise the head's parameters too: it is a separate module, so add nitp.parameters() to the optimiser.
  4. Drop the head after training: it never lives inside the model, so save_pretrained / the checkpoint
     holds only the LM, and inference costs nothing extra.

Run: python hf_example.py [--arch gpt2|llama|both] [--steps 20]
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built from a config: never reach the hub

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel

from nitp import NITP, NITPConfig

N_LAYER, WIDTH, N_HEAD, VOCAB, SEQ_LEN = 4, 64, 4, 256, 64  # tiny: one token per byte, trains on a CPU


def build_model(arch: str) -> PreTrainedModel:
    """A freshly initialised tiny causal LM. No ids 50256 etc. (GPT-2's defaults) outside the byte vocabulary."""
    special = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=WIDTH, n_layer=N_LAYER,
                            n_head=N_HEAD, **special)  # ties lm_head to wte, like GPT-2
    elif arch == "llama":
        config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=SEQ_LEN, hidden_size=WIDTH,
                             intermediate_size=176, num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD,
                             **special)  # untied lm_head, RMSNorm, RoPE, SwiGLU MLP
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return AutoModelForCausalLM.from_config(config)


def nitp_states(outputs, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, z) from the outputs of model(..., output_hidden_states=True).

    For GPT-2 and Llama, hidden_states has n_layer + 1 entries: [0] is the input of the first block (the
    embeddings), [i] the output of block i, except the last entry, which HF replaces by last_hidden_state,
    i.e. AFTER the final norm: exactly the LM head's input, h. So hidden_states[n_layer] is not the raw
    output of the last block, and k must stay below n_layer (NITP's own range check says the same)."""
    states = outputs.hidden_states
    if not 0 <= k < len(states) - 1:
        raise ValueError(f"k must be in 0..{len(states) - 2}, got {k}")
    return states[-1], states[k]  # (B, T, d) h, (B, T, d) z


def losses(model: PreTrainedModel, nitp: NITP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, lm, nitp) for a batch of token ids x (B, T), all from ONE forward pass."""
    # labels=x: HF shifts the labels inside, so position t is scored on token t+1
    out = model(x, labels=x, output_hidden_states=True, use_cache=False)
    h, z = nitp_states(out, nitp.layer)  # (B, T, d), (B, T, d)
    loss_nitp = nitp(h, z)               # scalar; nitp detaches z, so z stays a target only
    return out.loss + nitp.config.lam * loss_nitp, out.loss, loss_nitp


def byte_batches(batch_size: int = 8, seq_len: int = SEQ_LEN, seed: int = 0):
    """Endless random windows of the Python reference docs (shipped with Python), one token per byte."""
    from pydoc_data.topics import topics
    data = torch.tensor(list("\n\n".join(topics[k] for k in sorted(topics)).encode()))  # (N,) byte ids
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=g)  # (B,)
        yield torch.stack([data[s:s + seq_len] for s in starts])                    # (B, T)


def train(model: PreTrainedModel, nitp: NITP, batches, steps: int, lr: float = 3e-3,
          log_every: int = 5) -> list[tuple[float, float]]:
    """AdamW over the model's AND the head's parameters; returns (lm, nitp) loss per step."""
    optimizer = torch.optim.AdamW([*model.parameters(), *nitp.parameters()], lr=lr)  # the head learns too
    model.train()
    nitp.train()
    history = []
    for step in range(steps):
        total, lm, loss_nitp = losses(model, nitp, next(batches))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        history.append((lm.item(), loss_nitp.item()))
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:3d} | total {total.item():.4f} | lm {lm.item():.4f} | nitp {loss_nitp.item():.4f}")
    return history


def saved_keys(model: PreTrainedModel, directory: str | Path) -> set[str]:
    """save_pretrained(directory), then the tensor names in the safetensors file(s) it wrote."""
    model.save_pretrained(directory)
    keys = set()
    for file in Path(directory).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys |= set(f.keys())
    return keys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["gpt2", "llama", "both"], default="both")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    for arch in ["gpt2", "llama"] if args.arch == "both" else [args.arch]:
        start = time.time()
        torch.manual_seed(0)
        model = build_model(arch)
        # num_hidden_layers / hidden_size are the generic names (GPT2Config maps them to n_layer / n_embd)
        nitp = NITP(NITPConfig(), n_layer=model.config.num_hidden_layers, n_embd=model.config.hidden_size)
        n_model = sum(p.numel() for p in model.parameters())
        n_head = sum(p.numel() for p in nitp.parameters())
        print(f"{arch}: {n_model / 1e3:.0f}k parameters + NITP head {n_head / 1e3:.0f}k (training only), "
              f"target block k={nitp.layer}")
        history = train(model, nitp, byte_batches(), args.steps)
        print(f"  lm loss {history[0][0]:.3f} -> {history[-1][0]:.3f}, "
              f"nitp loss {history[0][1]:.3f} -> {history[-1][1]:.3f}")

        # The head was never registered in the model, so the saved LM cannot contain it.
        with tempfile.TemporaryDirectory() as tmp:
            keys = saved_keys(model, tmp)
        head_names = list(nitp.state_dict())  # e.g. head.gate.weight, head.up.weight, head.down.weight
        leaked = [key for key in keys if any(name in key for name in head_names)]
        assert not leaked and keys <= set(model.state_dict()), leaked
        print(f"  save_pretrained wrote {len(keys)} tensors, none of the head's {head_names}; "
              f"{time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
