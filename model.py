"""A small GPT in the style of nanoGPT: pre-LN transformer blocks, causal self-attention, tied embeddings.

Nothing here is specific to NITP. `forward` hands back, beside the logits, the output of every block from
the same pass (`block_outputs`, like Hugging Face's `output_hidden_states`): NITP takes its target from
there (see nitp.py), and the evaluation measures the geometry of every layer.

Reading order: the dense GPT first (config, attention, MLP, block, GPT), then what the experiments count
(FLOPs, size), then the top-k Mixture-of-Experts layer that replaces the MLP when --n-expert > 1.
"""
import contextlib
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
    # Mixture-of-Experts (see MoE below). n_expert = 1 is the dense GPT.
    n_expert: int = 1          # routed experts per MoE layer
    experts_per_token: int = 1  # k of top-k routing: the experts each token is sent to (--top-k)
    n_shared: int = 0          # always-on shared experts per MoE layer
    n_dense_layers: int = 1    # the first blocks keep a dense MLP, as in the paper's models
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss
    z_loss_coef: float = 0.0     # weight of the router z-loss

    def __post_init__(self):
        checks = [
            (self.vocab_size >= 1, f"vocab_size must be at least 1, got {self.vocab_size}"),
            (self.block_size >= 2, f"block_size must be at least 2, got {self.block_size}"),
            (self.n_layer >= 1, f"n_layer must be at least 1, got {self.n_layer}"),
            (self.n_head >= 1, f"n_head must be at least 1, got {self.n_head}"),
            (self.n_embd >= 1, f"n_embd must be at least 1, got {self.n_embd}"),
            (self.n_expert >= 1, f"n_expert must be at least 1, got {self.n_expert}"),
            (1 <= self.experts_per_token <= self.n_expert,
             f"--top-k (experts per token) must be in 1..n_expert={self.n_expert}, got {self.experts_per_token}"),
            (self.n_shared >= 0, f"n_shared must be >= 0, got {self.n_shared}"),
            (self.n_dense_layers >= 0, f"n_dense_layers must be >= 0, got {self.n_dense_layers}"),
            (self.n_expert == 1 or self.n_dense_layers < self.n_layer,
             f"n_dense_layers ({self.n_dense_layers}) leaves no MoE layer in a {self.n_layer}-layer model"),
            (self.aux_loss_coef >= 0 and self.z_loss_coef >= 0, "aux_loss_coef and z_loss_coef must be >= 0"),
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
    block_outputs: tuple[torch.Tensor, ...]   # n_layer + 1 of (B, T, d): [0] the embeddings, [k] block k's output
    aux_loss: torch.Tensor | None = None      # MoE only: weighted balancing + z-loss, for training only
    expert_share: torch.Tensor | None = None  # MoE only: (n_moe_layers, E) fraction of routed slots per expert


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
        if x.device.type == "mps":  # MPS attention read strided q/k/v wrongly in torch 2.8-2.12 (pytorch#181133)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
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

    def __init__(self, config: GPTConfig, moe: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MoE(config) if moe else MLP(config)  # MoE: at the end of this file

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        """Returns the new residual stream, and the router's statistics if this is an MoE block."""
        x = x + self.attn(self.ln_1(x))
        if isinstance(self.mlp, MoE):
            y, router_stats = self.mlp(self.ln_2(x))
            return x + y, router_stats
        return x + self.mlp(self.ln_2(x)), None


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        self.blocks = nn.ModuleList(Block(config, moe=config.n_expert > 1 and i >= config.n_dense_layers)
                                    for i in range(config.n_layer))
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

    def num_params(self, active: bool = False) -> int:
        """All parameters (the tied weight once), or only those one token uses: k of the E routed experts."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for block in self.blocks:
                if isinstance(block.mlp, MoE):
                    unused = len(block.mlp.experts) - block.mlp.experts_per_token
                    total -= unused * sum(p.numel() for p in block.mlp.experts[0].parameters())
        return total

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> GPTOutput:
        """idx, targets: (B, T) token ids."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, d)
        block_outputs = [x]                # in training autograd keeps these anyway: listing them costs nothing
        router_stats = []
        for block in self.blocks:
            x, stats = block(x)  # (B, T, d)
            block_outputs.append(x)
            if stats is not None:
                router_stats.append(stats)
        hidden = self.ln_f(x)           # (B, T, d)
        logits = self.lm_head(hidden)   # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(B * T))
        out = GPTOutput(logits, loss, hidden, tuple(block_outputs))
        if router_stats:  # averaged over the MoE layers; kept out of `loss`, which stays the pure LM loss
            c = self.config
            out.aux_loss = (c.aux_loss_coef * torch.stack([s["balance"] for s in router_stats]).mean()
                            + c.z_loss_coef * torch.stack([s["z"] for s in router_stats]).mean())
            out.expert_share = torch.stack([s["share"] for s in router_stats]).detach()
        return out

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
            # Sample on the CPU, in fp32: MPS's multinomial has been seen to pick masked (zero-probability)
            # tokens, and one token per step is no work for a GPU anyway.
            probs = F.softmax(logits.float(), dim=-1).cpu()                   # (B, V)
            next_token = torch.multinomial(probs, num_samples=1).to(idx.device)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)
        return idx


def flops_per_token(model: GPT, head: nn.Module | None = None) -> float:
    """Training FLOPs per token, counted as in the PaLM paper: 6 per weight a token passes through (2 forward,
    4 backward), counting k of the E routed experts and the tied LM head but not the embedding lookups, plus
    attention, 12 · n_layer · block_size · d. A training-only head (NITP's) adds 6 · its weights: 6 · 12d² for
    the paper's SwiGLU."""
    c = model.config
    weights = model.num_params(active=True) - model.wpe.weight.numel()
    extra = sum(p.numel() for p in head.parameters()) if head is not None else 0
    return 6 * (weights + extra) + 12 * c.n_layer * c.block_size * c.n_embd


def model_size(model: GPT) -> str:
    """Parameters, named as the paper names its models: total, and active per token for MoE ("1.9B-A0.3B")."""
    def short(n: int) -> str:
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    total, active = model.num_params(), model.num_params(active=True)
    return short(total) if total == active else f"{short(total)}-A{short(active)}"


# ----------------------------------------------------------------------------------------------------
# Mixture of Experts: in a model with n_expert > 1, the blocks after the first n_dense_layers use this in place
# of the MLP. The dense GPT above never touches it.

class MoE(nn.Module):
    """Top-k Mixture-of-Experts: a router sends each token to k of E expert MLPs, plus S shared experts.

    Dropless: every token reaches its k experts (no capacity limit). Each expert runs only on the tokens
    routed to it, so the cost grows with k, not with E."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.experts_per_token = config.experts_per_token
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_expert))
        self.shared = nn.ModuleList(MLP(config) for _ in range(config.n_shared))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, d) tokens. Returns the router logits and probabilities (N, E), and each token's k experts
        with their gate weights (N, k)."""
        # Routing decisions in fp32, out of autocast. Only CUDA and the CPU ever autocast here (MPS trains in
        # fp32, and torch before 2.5 refuses even a disabled autocast on MPS), so only they need the switch.
        fp32 = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cuda", "cpu") \
            else contextlib.nullcontext()
        with fp32:
            logits = F.linear(x.float(), self.router.weight.float())  # (N, E)
        probs = logits.softmax(dim=-1)                       # (N, E) softmax over all experts
        # The gates are the chosen experts' probabilities themselves, not renormalized over the k (Switch,
        # DeepSeek-V2). Renormalizing (Mixtral) would make the single gate of top-1 routing exactly 1, and
        # the router would learn from the balancing loss alone, never from the LM loss.
        gates, chosen = probs.topk(self.experts_per_token, dim=-1)       # (N, k), (N, k); each row sums to at most 1
        return logits, probs, gates, chosen

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        B, T, d = x.shape
        x = x.reshape(B * T, d)                              # (N, d) tokens
        logits, probs, gates, chosen = self.route(x)
        # Group the N·k routed slots by expert, run each expert once on its own tokens, scatter back.
        slot_expert = chosen.flatten()                            # (N·k,) the expert of each slot
        order = slot_expert.argsort(stable=True)                  # (N·k,) slots sorted by expert
        counts = torch.bincount(slot_expert, minlength=len(self.experts))  # (E,) tokens per expert
        token = order // self.experts_per_token                              # (N·k,) the token of each sorted slot
        # counts.tolist() waits for the device, once per MoE layer and forward pass (and splits a compiled
        # graph there): the price of running each expert on exactly its own tokens, with plain Python.
        chunks = x[token].split(counts.tolist())                  # E pieces of (n_e, d)
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])  # (N·k, d)
        y = y * gates.flatten()[order, None]                      # weight by the gate
        out = torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))  # (N, d) sum of each token's k experts
        for expert in self.shared:
            out = out + expert(x)

        # Load balancing (Switch / Mixtral): E · sum_i f_i · P_i, where f_i is the fraction of the N·k routed
        # slots that went to expert i and P_i the mean router probability of expert i. Uniform routing
        # gives 1; everything on one expert gives E. f is a count (no gradient); P carries it to the router.
        share = counts.float() / slot_expert.numel()              # (E,) f
        balance = len(self.experts) * (share * probs.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()  # keeps router logits small (ST-MoE)
        return out.view(B, T, d), {"balance": balance, "z": z_loss, "share": share}
