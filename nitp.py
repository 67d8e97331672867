"""NITP, Next Implicit Token Prediction (Zhang et al., ICML 2026, arXiv 2605.24956), in one file.

Next-token prediction (NTP) trains the final hidden state h_t to predict the next token through the LM
head. NITP adds a second target for the same vector: the model's own *representation* of the next
position, taken from a shallow layer of the same forward pass:

    L_NITP = mean over t of  1 - cos( P(h_t), sg(z_{t+1}) )
    L      = L_NTP + λ · L_NITP                       (λ = 1.0, on from step 0)

  h_t      final hidden state at position t: the vector the LM head reads (after the final LayerNorm).
  z_{t+1}  output of block k at position t+1, from the same pass; k ≈ 20% of the depth.
  sg(.)    stop-gradient: z is a target only; without it the model can collapse z towards P(h).
  P        projection head, a SwiGLU MLP d -> 4d -> d (12·d² weights), used in training only.
  The last position has no t+1, so it has no NITP term.

Why it helps (the paper's reading): token targets only ask h_t to separate next tokens; the shallow
representation of the next position is a dense, continuous target that keeps more directions of h_t in
use. The paper sees a higher effective rank and lower anisotropy of the last hidden states, with the
validation loss unchanged. `effective_rank` and `anisotropy` below measure exactly that.

Choices the paper leaves open, and ours:
  - h is taken after the final LayerNorm (what the LM head sees); z is the raw residual stream after
    block k, with no norm, since the cosine ignores scale and a norm would only add parameters to the
    target path.
  - The head is initialised like the backbone, N(0, 0.02): the cosine is scale-free, so the head only
    needs small, symmetry-breaking weights to start.
The switches in NITPConfig are the paper's ablations (how far our runs reproduce its results: RESULTS.md,
"Ablations"); their defaults are the method.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS = ("swiglu", "linear", "none")
LOSSES = ("cosine", "mse", "smooth_l1")


@dataclass
class NITPConfig:
    lam: float = 1.0          # λ, the weight of L_NITP in the total loss
    layer: int | None = None  # k, the target block; None = round(0.2 · n_layer), at least 1; 0 = embeddings
    # Ablations from the paper; the defaults are NITP itself.
    shift: int = 1            # 1: P(h_t) predicts z_{t+1}. 0: it predicts z_t (same position)
    stopgrad: bool = True     # False: gradients also flow into the target z
    head: str = "swiglu"      # "linear": one d x d matrix; "none": compare h_t with z directly
    head_width: int | None = None  # the SwiGLU head's hidden width; None = 4d, the paper's
    loss: str = "cosine"      # or "mse" / "smooth_l1" between the raw vectors
    start: int = 0            # the training step at which L_NITP switches on
    # A control, not part of the method: NITP's head and loss with no predictive content. Each step the targets
    # trade places at random over (batch, position), so the head can at best learn their mean direction.
    shuffled: bool = False

    def __post_init__(self):
        if not self.lam >= 0:  # also rejects NaN
            raise ValueError(f"NITP lambda must be >= 0, got {self.lam}")
        if self.shift not in (0, 1):
            raise ValueError(f"NITP shift must be 1 (next position) or 0 (same position), got {self.shift}")
        if self.head not in HEADS:
            raise ValueError(f"NITP head must be one of {HEADS}, got {self.head!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"NITP loss must be one of {LOSSES}, got {self.loss!r}")
        if self.start < 0:
            raise ValueError(f"NITP start step must be >= 0, got {self.start}")
        if self.head_width is not None and (self.head != "swiglu" or self.head_width < 1):
            raise ValueError(f"NITP head width must be >= 1, for the swiglu head only; got {self.head_width} "
                             f"with head {self.head!r}")


def default_layer(n_layer: int) -> int:
    """k = round(0.2 · n_layer), at least 1 (never the embeddings). The paper picks 4 of 17, 5 of 24 and 6 of
    28 layers; this rule gives 3, 5 and 6: it matches the paper at 24 and 28 layers, not at 17."""
    return max(1, round(0.2 * n_layer))


class SwiGLUHead(nn.Module):
    """P: d -> w -> d with a SwiGLU gate, 3·d·w weights: w = 4d gives the paper's 12d²."""

    def __init__(self, d: int, width: int | None = None):
        super().__init__()
        width = width or 4 * d
        self.gate = nn.Linear(d, width, bias=False)
        self.up = nn.Linear(d, width, bias=False)
        self.down = nn.Linear(width, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(h)) * self.up(h))  # (..., d) -> (..., w) -> (..., d)


def target_layer(config: NITPConfig, n_layer: int) -> int:
    """k for a model of n_layer blocks: the configured one, or the default. Raises ValueError if out of range.
    The last block's output is h itself (before the final norm): never a target."""
    layer = default_layer(n_layer) if config.layer is None else config.layer
    if not 0 <= layer <= n_layer - 1:
        raise ValueError(f"NITP target layer must be in 0..{n_layer - 1} for a {n_layer}-layer model, got {layer}")
    return layer


class NITP(nn.Module):
    """The projection head and the NITP loss. It owns no part of the backbone and is dropped after training."""

    def __init__(self, config: NITPConfig, n_layer: int, n_embd: int):
        super().__init__()
        self.config = config
        self.layer = target_layer(config, n_layer)
        if config.head == "swiglu":
            self.head = SwiGLUHead(n_embd, config.head_width)
        elif config.head == "linear":
            self.head = nn.Linear(n_embd, n_embd, bias=False)
        else:
            self.head = nn.Identity()
        for p in self.head.parameters():
            nn.init.normal_(p, mean=0.0, std=0.02)

    def pairs(self, h: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (B, T, d) final hidden states; z: (B, T, d) outputs of block k, from the same pass.
        Returns the prediction P(h_t) and its target sg(z_{t+shift}), (B, T-shift, d) each, in fp32."""
        s = self.config.shift
        T = h.size(1)
        pred = self.head(h[:, :T - s]).float()  # (B, T-s, d)  P(h_t) for t = 0 .. T-1-s
        target = z[:, s:].float()               # (B, T-s, d)  z_{t+s}: the last h has no z_{t+1}
        if self.config.stopgrad:
            target = target.detach()            # sg(z): z is a target, never pulled towards P(h)
        if self.config.shuffled:                # the control: each P(h_t) gets the target of a random (b, t')
            order = torch.randperm(target.size(0) * target.size(1), device=target.device)
            target = target.flatten(0, 1)[order].view_as(target)
        return pred, target

    def distances(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, T-shift): entry t is the distance between P(h_t) and z_{t+shift}."""
        pred, target = self.pairs(h, z)         # (B, T-s, d) each
        if self.config.loss == "cosine":
            return 1 - F.cosine_similarity(pred, target, dim=-1)
        if self.config.loss == "mse":
            return F.mse_loss(pred, target, reduction="none").mean(dim=-1)
        return F.smooth_l1_loss(pred, target, reduction="none").mean(dim=-1)

    def forward(self, h: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """L_NITP: the mean distance over all positions that have a target.

        mask: optional (B, T-shift) bool, which pairs (t, t+shift) count. Padding and packed documents need
        one, or P(h_t) would learn to predict a pad or the next document's first token. With shift 1:
          from an attention mask a (B, T):   mask = a[:, :-1].bool() & a[:, 1:].bool()
          from document ids doc (B, T):      mask = doc[:, :-1] == doc[:, 1:]"""
        distances = self.distances(h, z)  # (B, T-shift)
        if mask is None:
            return distances.mean()
        # where(), not distances[mask]: no host sync for the count; 0, not NaN, when no pair counts
        return torch.where(mask, distances, 0.0).sum() / mask.sum().clamp(min=1)


class TrainingLoss(nn.Module):
    """The training objective, from ONE backbone pass: L = L_NTP + λ · L_NITP (+ the MoE balancing loss).

    One module holding the backbone and the NITP head, so that one optimizer (and, under torchrun, one
    DistributedDataParallel) sees both. With nitp=None it is plain NTP. forward returns the total, to
    backpropagate, and its parts, to log."""

    def __init__(self, model: nn.Module, nitp: NITP | None):
        super().__init__()
        self.model, self.nitp = model, nitp

    def forward(self, x: torch.Tensor, y: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model(x, y)  # logits, h, and every block's output: NITP needs no second pass
        parts = {"lm": out.loss}
        total = out.loss
        if self.nitp is not None and step >= self.nitp.config.start:
            parts["nitp"] = self.nitp(out.hidden, out.block_outputs[self.nitp.layer])  # h, and z from the same pass
            total = total + self.nitp.config.lam * parts["nitp"]                       # L_NTP + λ · L_NITP
        if out.aux_loss is not None:  # MoE models: router load balancing, already weighted
            parts["moe_aux"] = out.aux_loss
            total = total + out.aux_loss
        return total, parts


def diagnostics(model: nn.Module, nitp: NITP, x: torch.Tensor, y: torch.Tensor, autocast,
                loss_scale: float = 1.0) -> dict:
    """Is NITP alive, or inert, or collapsing? Measured on one batch (the evaluation's first), outside training:
      nitp_cos                  mean cos(P(h_t), z_{t+1}): near 0 if the head predicts nothing
      nitp_cos_mean_direction   the mean cosine that predicting one direction, the batch's mean target direction,
                                would reach: nitp_cos above it is more than the average of the targets
      pred_norm, target_norm    mean L2 norms of P(h_t) and of z_{t+1}: a collapse shows as a norm going to 0
      grad_lm, grad_nitp        norms of the backbone's gradients of L_NTP and of λ·L_NITP
      grad_nitp_share           grad_nitp / (grad_lm + grad_nitp): NITP's share of what moves the backbone
      grad_cos                  cosine between those two gradients: do the losses pull the same way?
    The gradients come from torch.autograd.grad: the .grad that the optimizer reads is not touched. Under float16,
    pass the gradient scaler's scale as loss_scale: as in training, each loss is multiplied by it before the
    backward (float16's small gradients underflow to 0 otherwise) and the gradients divided by it after."""
    was_training = model.training
    model.eval()
    backbone = list(model.parameters())
    with torch.enable_grad(), autocast:
        out = model(x, y)
        h, z = out.hidden, out.block_outputs[nitp.layer]            # (B, T, d) each
        pred, target = nitp.pairs(h, z)                             # (B, T-s, d) each: P(h_t), z_{t+s}
        weighted_nitp = nitp.config.lam * nitp(h, z)
    g_lm, g_nitp = (backbone_gradient(loss, backbone, loss_scale) for loss in (out.loss, weighted_nitp))  # (n_params,)
    model.train(was_training)
    norm_lm, norm_nitp = g_lm.norm().item(), g_nitp.norm().item()
    return {"nitp_cos": F.cosine_similarity(pred, target, dim=-1).mean().item(),
            "nitp_cos_mean_direction": mean_direction_cos(target),
            "pred_norm": pred.norm(dim=-1).mean().item(), "target_norm": target.norm(dim=-1).mean().item(),
            "grad_lm": norm_lm, "grad_nitp": norm_nitp,
            "grad_nitp_share": norm_nitp / (norm_lm + norm_nitp) if norm_lm + norm_nitp > 0 else 0.0,
            "grad_cos": F.cosine_similarity(g_lm, g_nitp, dim=0).item()}


def backbone_gradient(loss: torch.Tensor, params: list[nn.Parameter], scale: float) -> torch.Tensor:
    """(n_params,) the gradient of loss for params, flat, in fp32: computed for loss · scale and divided back, the
    scale halved while that overflows (what float16's gradient scaler does in training). Scale 1: loss's own."""
    while True:
        with torch.enable_grad():  # the evaluation runs under no_grad: the product must join loss's graph
            scaled = loss * scale if scale != 1 else loss
        grads = torch.autograd.grad(scaled, params, retain_graph=True, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                          for g, p in zip(grads, params)])  # (n_params,)
        if scale == 1:
            return flat
        if scale < 2 or torch.isfinite(flat).all():
            return flat / scale
        scale /= 2


def mean_direction_cos(target: torch.Tensor) -> float:
    """(B, T, d) targets -> the mean cosine between each target and their mean direction (the normalized mean of
    the unit targets): 1 if all point one way, near 0 for directions spread evenly."""
    units = F.normalize(target.detach().float().flatten(0, 1), dim=-1)  # (B·T, d)
    return (units @ F.normalize(units.mean(dim=0), dim=0)).mean().item()


# ----------------------------------------------------------------------------------------------------
# What NITP claims to change: the geometry of the last hidden states, measured on many states at once. The
# evaluation adds the states of every validation batch to a Geometry (B windows of T positions at a time), which
# keeps sums only: no states are held, however many batches. The states are copied to the CPU as they are and
# everything is computed there in float64, so that the numbers do not depend on where the model trained (and
# float64, eigvalsh and entr need no GPU kernel, which MPS lacks).

class Geometry:
    """Effective rank and anisotropy of a set of states, accumulated window by window."""

    def __init__(self):
        self.n = self.windows = self.pairs_within = 0  # states, windows, ordered pairs of states in one window
        self.sum = self.outer = self.unit_sum = None  # Σx (d,), Σxxᵀ (d, d), Σ of the unit vectors x/|x| (d,)
        self.unit_within = 0.0                         # Σ over windows of |Σ_(t in window) x_t/|x_t| |²

    @torch.no_grad()
    def add(self, states: torch.Tensor) -> "Geometry":
        """states: (W, T, d), T states (positions) from each of W windows of text; (N, d) is N windows of one."""
        # To the CPU in the states' own dtype, and only then to float64: .to("cpu", torch.float64) casts on the
        # device before the copy, and MPS has no float64 (an error, or zeros, depending on the torch version).
        x = states.detach().cpu().double()
        x = x.reshape(-1, 1, x.size(-1)) if x.dim() == 2 else x  # (W, T, d)
        W, T, d = x.shape
        flat = x.reshape(W * T, d)                                # (N, d)
        window_sums = F.normalize(x, dim=-1).sum(dim=1)           # (W, d): Σ of each window's unit vectors
        if self.sum is None:
            self.sum, self.outer, self.unit_sum = torch.zeros(d, dtype=torch.float64), \
                torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        self.sum += flat.sum(dim=0)
        self.outer += flat.T @ flat
        self.unit_sum += window_sums.sum(dim=0)
        self.unit_within += (window_sums * window_sums).sum().item()
        self.n, self.windows, self.pairs_within = self.n + W * T, self.windows + W, self.pairs_within + W * T * T
        return self

    def effective_rank(self) -> float:
        """exp(entropy) of the normalized eigenvalues of the states' covariance.

        d equally used directions give d; a single direction gives 1. This is the paper's definition. Roy &
        Vetterli's effective rank normalizes the singular values of the centred states instead; the covariance
        eigenvalues are those singular values squared, which weighs the leading directions more and gives a
        lower number. We follow the paper, to compare with its figures."""
        mean = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)  # (d, d)
        eigenvalues = torch.linalg.eigvalsh(cov).clamp(min=0)  # (d,) tiny negatives are rounding noise
        p = eigenvalues / eigenvalues.sum()
        return torch.special.entr(p).sum().exp().item()  # entr(p) = -p·log p, with entr(0) = 0

    def anisotropy(self) -> float:
        """Mean cosine similarity between states of different windows: 0 for directions spread evenly, 1 for one
        direction. Pairs within a window are left out, as the paper takes pairs across sentences: neighbouring
        positions of one text are alike for reasons that have nothing to do with the geometry of the space."""
        # Σ over ordered pairs (i, j), i ≠ j, of cos(x_i, x_j) is |Σ u|² − Σ_i |u_i|²; taking away each window's
        # |Σ_(t in window) u_t|² instead leaves the pairs across windows only (and the diagonal with them).
        across = self.unit_sum @ self.unit_sum - self.unit_within
        return (across / (self.n * self.n - self.pairs_within)).item()


def effective_rank(states: torch.Tensor) -> float:
    """The effective rank of (N, d) states (or of (W, T, d) windows of them): see Geometry.effective_rank."""
    return Geometry().add(states).effective_rank()


def anisotropy(states: torch.Tensor) -> float:
    """The anisotropy of (W, T, d) windows of states (pairs across windows), or of (N, d) states (every pair of
    distinct states): see Geometry.anisotropy."""
    return Geometry().add(states).anisotropy()
