"""A small GPT in the style of nanoGPT: pre-LN transformer blocks, causal self-attention, tied embeddings.

Nothing here is specific to NITP except one thing: `forward` can hand back, from the same pass, the output
of an intermediate block (`tap_layer`). NITP uses it as its target; see nitp.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128  # the longest context the model sees
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128

    def __post_init__(self):
        checks = [
            (self.vocab_size >= 1, f"vocab_size must be at least 1, got {self.vocab_size}"),
            (self.block_size >= 2, f"block_size must be at least 2, got {self.block_size}"),
            (self.n_layer >= 1, f"n_layer must be at least 1, got {self.n_layer}"),
            (self.n_head >= 1, f"n_head must be at least 1, got {self.n_head}"),
            (self.n_embd >= 1, f"n_embd must be at least 1, got {self.n_embd}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


@dataclass
class GPTOutput:
    logits: torch.Tensor                # (B, T, V)
    loss: torch.Tensor | None           # next-token cross-entropy, if targets were given
    hidden: torch.Tensor                # (B, T, d) final hidden states: the LM head's input (after ln_f)
    tapped: torch.Tensor | None = None  # (B, T, d) output of block `tap_layer` (0 = the embeddings)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.proj.residual_out = True  # see GPT._init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                          # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, C/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)    # (B, H, T, C/H)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.up = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.down = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.down.residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))  # (B, T, d) -> (B, T, 4d) -> (B, T, d)


class Block(nn.Module):
    """Pre-LN: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input and output embeddings
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02), with the projections that write into the residual stream scaled by
        1/sqrt(2 * n_layer), so that the stream's variance does not grow with depth."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if getattr(module, "residual_out", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied weight is counted once

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                tap_layer: int | None = None) -> GPTOutput:
        """idx, targets: (B, T) token ids. tap_layer=k also returns the output of block k (1-based;
        0 = the embedding output) from this same pass."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, d)
        tapped = x if tap_layer == 0 else None
        for layer, block in enumerate(self.blocks, start=1):
            x = block(x)  # (B, T, d)
            if layer == tap_layer:
                tapped = x
        hidden = self.ln_f(x)           # (B, T, d)
        logits = self.lm_head(hidden)   # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(B * T))
        return GPTOutput(logits, loss, hidden, tapped)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        """Extend idx (B, T) by sampling max_new_tokens tokens, one at a time."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]                       # (B, <=block_size)
            logits = self(context).logits[:, -1, :] / max(temperature, 1e-6)  # (B, V)
            if top_k is not None:
                kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                logits = logits.masked_fill(logits < kth_best, float("-inf"))
            next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)
        return idx
