"""Train a small GPT with next-token prediction (NTP), or with NTP + NITP.

    python train.py            # the NTP baseline
    python train.py --nitp     # the same run with the NITP loss added
    python train.py --compare  # both, side by side, over three seeds (compare.py)
    torchrun --standalone --nproc_per_node=8 train.py --nitp   # data-parallel (DDP) over 8 GPUs

Every run writes OUT_DIR/metrics.jsonl (one line per step, one per eval) and OUT_DIR/ckpt.pt.
Exit status: 0 done; 2 bad input; 3 a loss term or the gradient norm became NaN or infinite (the checkpoint
keeps the last good state); 130 interrupted with Ctrl-C, after saving a checkpoint to resume from.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import probe
from data import TOKENIZERS, get_batch, labelled_sections, load_dataset
from compare import compare
from devices import DTYPES, autocast_for, check_compile, grad_scaler, pick_device, pick_dtype, to_device, torchrun_rank
from model import GPT, GPTConfig
from nitp import HEADS, LOSSES, NITP, NITPConfig, anisotropy, effective_rank, training_loss

CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = {"step", "model", "nitp", "optimizer", "args", "rng"}  # what --resume reads
# Flags that may differ when resuming: they change how long, where or how fast we train, not what is trained.
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "log_interval", "device", "dtype", "compile"}
# Flags that say what to do now, not how the run was trained: never taken from a checkpoint.
COMMANDS = {"resume", "probe", "compare", "seeds", "out_dir"}


def say_error(message: str) -> None:
    """One line on stderr; under torchrun, from rank 0 only, not once per process."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage; one line that says what to do is enough
        say_error(f"{self.prog}: error: {message} (see --help)")
        self.exit(2)


def finite_float(text: str) -> float:
    value = float(text)  # a ValueError here becomes argparse's "invalid finite_float value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Train a small GPT with NTP, or NTP + NITP.", allow_abbrev=False,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("NITP")
    g.add_argument("--nitp", action="store_true", help="add the NITP loss (without it: the NTP baseline)")
    g.add_argument("--nitp-lambda", type=finite_float, default=1.0, help="λ, the weight of the NITP loss")
    g.add_argument("--nitp-layer", type=int, default=None,
                   help="target block k (0 = embeddings); default round(0.2 * n_layer), at least 1")
    g.add_argument("--nitp-shift", type=int, choices=(1, 0), default=1,
                   help="ablation: 1 predicts z_{t+1} (NITP), 0 predicts z_t (same position)")
    g.add_argument("--nitp-no-stopgrad", action="store_true", help="ablation: let gradients flow into the target")
    g.add_argument("--nitp-head", choices=HEADS, default="swiglu", help="ablation: the projection head P")
    g.add_argument("--nitp-loss", choices=LOSSES, default="cosine", help="ablation: the distance between P(h) and z")
    g.add_argument("--nitp-start", type=int, default=0, help="ablation: the step at which the NITP loss switches on")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="python-docs",
                   help="'python-docs' (embedded), 'shakespeare' (downloaded once) or a path to a UTF-8 text file")
    g.add_argument("--tokenizer", choices=TOKENIZERS, default="bytes",
                   help="'bytes' (256 tokens, offline) or a standard tiktoken encoding")
    # The defaults are the classroom setting (RESULTS.md, section 1): chosen on seeds 1-3 as the fastest setting
    # in which NITP's effect on the geometry exceeds the seed spread, then confirmed on fresh seeds.
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=int, default=4, help="number of transformer blocks")
    g.add_argument("--n-head", type=int, default=4, help="attention heads per block")
    g.add_argument("--n-embd", type=int, default=128, help="model width d")
    g.add_argument("--block-size", type=int, default=64, help="context length in tokens")
    g = p.add_argument_group("mixture of experts")
    g.add_argument("--n-expert", type=int, default=1, help="routed experts per MoE layer (1 = dense MLP)")
    g.add_argument("--top-k", type=int, default=1, help="experts each token is routed to")
    g.add_argument("--n-shared", type=int, default=0, help="always-on shared experts per MoE layer")
    g.add_argument("--n-dense-layers", type=int, default=1, help="first blocks that stay dense when --n-expert > 1")
    g.add_argument("--aux-loss-coef", type=finite_float, default=0.01, help="weight of the load-balancing loss")
    g.add_argument("--z-loss-coef", type=finite_float, default=0.0, help="weight of the router z-loss (0 = off)")
    g = p.add_argument_group("training")
    g.add_argument("--max-iters", type=int, default=1000, help="optimizer steps in total")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch, per process under torchrun")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning-rate", type=finite_float, default=2e-3, help="peak learning rate")
    g.add_argument("--warmup-iters", type=int, default=None,
                   help="steps of linear warm-up before the cosine decay (default: a tenth of --max-iters)")
    g.add_argument("--weight-decay", type=finite_float, default=0.1, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=finite_float, default=1.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--seed", type=int, default=1337, help="seed for the weights and the batch order")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="evaluate and checkpoint every this many steps (default: a tenth of --max-iters)")
    g.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation")
    g.add_argument("--log-interval", type=int, default=20, help="print a progress line every this many steps")
    g.add_argument("--out-dir", default="out", help="where metrics.jsonl and ckpt.pt go")
    g.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out-dir")
    g = p.add_argument_group("the NTP vs NITP experiment (compare.py)")
    g.add_argument("--compare", action="store_true",
                   help="train NTP and NITP from the same weights on the same batches, and compare them")
    g.add_argument("--seeds", type=int, default=3, help="with --compare: this many seeds, from --seed")
    g.add_argument("--probe", action="store_true",
                   help="no training: score the frozen model in --out-dir on the probe.py tasks, with baselines")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu), or a torch device name")
    g.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="'auto': bfloat16 on CUDA GPUs that have it natively, float16 on older ones, float32 "
                        "on the CPU and MPS; bfloat16/float16 train under autocast")
    g.add_argument("--compile", action="store_true", help="compile the model with torch.compile (CUDA, CPU)")
    return p


def parse_args(argv: list[str] | None = None, saved: dict | None = None) -> argparse.Namespace:
    """The command line. With `saved` (a checkpoint's settings), those are the defaults, and a flag given now
    may change only the RESUMABLE ones."""
    parser = make_parser()
    if saved is not None:
        saved = {k: v for k, v in saved.items() if k not in COMMANDS}
        parser.set_defaults(**saved)
    args = parser.parse_args(argv)
    if (args.compare or args.probe) and "RANK" in os.environ:
        parser.error("--compare and --probe run in one process: start them with python, not torchrun")
    if args.compare and (args.resume or args.probe):
        parser.error("--compare starts fresh runs (and probes them itself); drop --resume / --probe")
    if args.warmup_iters is None:
        args.warmup_iters = args.max_iters // 10
    if args.eval_interval is None:
        args.eval_interval = max(1, args.max_iters // 10)
    for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval", "seeds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.learning_rate <= 0 or args.warmup_iters < 0 or args.weight_decay < 0 or args.grad_clip < 0:
        parser.error("--learning-rate must be > 0; --warmup-iters, --weight-decay and --grad-clip >= 0")
    for name, value in (saved or {}).items():
        if name not in RESUMABLE and getattr(args, name) != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"the checkpoint in {args.out_dir} was trained with {flag} {value}, not "
                             f"{getattr(args, name)}; drop {flag} to resume, or use a new --out-dir")
    return args


def fail(message: str, status: int = 2) -> None:
    """A user error (status 2) or a diverged run (3): one line that says what to do, and a non-zero exit."""
    say_error(f"train.py: error: {message}")
    sys.exit(status)


def check_out_dir(out_dir: str) -> None:
    """Refuse an --out-dir we could not write to, before anything is built or written."""
    path = Path(out_dir)
    nearest = next(p for p in (path, *path.parents) if p.exists())  # the folder that mkdir would write into
    if not nearest.is_dir():
        raise ValueError(f"--out-dir {out_dir}: {nearest} is a file, not a folder; pick another --out-dir")
    try:  # the only sure test of "can I write here" (permissions, read-only mounts, /proc): try it, leave nothing
        tempfile.TemporaryDirectory(dir=nearest).cleanup()
    except OSError as e:
        raise ValueError(f"cannot write to --out-dir {out_dir} ({e.strerror}); pick a folder you can write to")


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to the peak, then cosine decay to a tenth of it at max_iters."""
    if step < args.warmup_iters:
        return args.learning_rate * (step + 1) / args.warmup_iters
    progress = (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    min_lr = args.learning_rate / 10
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (args.learning_rate - min_lr)


def make_optimizer(modules: list[torch.nn.Module], args, device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (2+ dims) only, never on norms and biases."""
    params = {id(p): p for m in modules for p in m.parameters()}.values()  # the tied weight once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), fused=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------
# Data parallel (DDP) under torchrun: every rank trains on its own slice of each batch; DDP averages gradients

def get_shard(tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
              rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch_size sequences of a global batch of world_size · batch_size.

    Every rank draws the same global batch from the same generator and keeps its own slice. So the ranks
    together see exactly the batches of one process with world_size times the batch size, and the generator
    state that the checkpoint saves is the same on every rank: resuming is exact under DDP too."""
    x, y = get_batch(tokens, world_size * batch_size, block_size, generator)  # (world_size·B, T) each
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    return x[mine], y[mine]  # (B, T), (B, T)


class TrainingLoss(torch.nn.Module):
    """nitp.training_loss as one module holding the backbone and the NITP head, so that DDP averages both."""

    def __init__(self, model: torch.nn.Module, nitp: NITP | None):
        super().__init__()
        self.model, self.nitp = model, nitp

    def forward(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        return training_loss(self.model, self.nitp, x, y, step)


def sync_step(terms: torch.Tensor, guarded: torch.Tensor, interrupted: bool,
              world_size: int) -> tuple[torch.Tensor, bool, bool]:
    """The one host sync of a training step. terms: (n,) this rank's loss terms; guarded: the values that must
    be finite. Returns the terms averaged over the ranks (the global batch's; still on the device), and, the
    same on every rank: did a guarded value become NaN or inf on some rank, did some rank get Ctrl-C. All
    ranks must stop at the same step, or the others hang."""
    flags = torch.stack([(~torch.isfinite(guarded)).any().float(),      # (2,) on the device: no copy, no wait
                         torch.full_like(terms[0], float(interrupted))])
    if world_size > 1:
        both = torch.cat([terms, flags])
        dist.all_reduce(both)  # a sum (gloo has no average): > 0 means "on some rank"
        terms, flags = both[:len(terms)] / world_size, both[len(terms):]
    bad, interrupted = (flags > 0).tolist()  # the sync
    return terms, bad, interrupted


# ----------------------------------------------------------------------------------------------------
# NaN / inf guard

class Diverged(Exception):
    """A loss term or the gradient norm is NaN or infinite: no update from here on can be trusted."""


def first_non_finite(values: dict[str, float]) -> str | None:
    """What went bad first, checking the parts of the loss (named as in training_loss) before their total, and
    the loss before the gradient norm: "the nitp loss is nan". None if everything is finite."""
    checks = [(f"the {name} loss", value) for name, value in values.items() if name not in ("loss", "grad_norm")]
    checks += [("the total loss", values["loss"])]
    checks += [("the gradient norm", values["grad_norm"])] if "grad_norm" in values else []
    return next((f"{what} is {value}" for what, value in checks if not math.isfinite(value)), None)


# ----------------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path: Path, state: dict) -> None:
    """Temp file, flush to disk, rename: a crash at any moment leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(out_dir: str) -> dict:
    path = Path(out_dir) / "ckpt.pt"
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path} to resume; train without --resume first, or point --out-dir at a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read checkpoint {path} ({type(e).__name__}): it is damaged or not from "
                         f"train.py; delete it or pick another --out-dir") from None
    if (not isinstance(ckpt, dict) or ckpt.get("format_version") != CHECKPOINT_VERSION
            or not CHECKPOINT_KEYS <= ckpt.keys()):
        raise ValueError(f"{path} is not a version-{CHECKPOINT_VERSION} train.py checkpoint; "
                         f"start a new run in another --out-dir")
    return ckpt


# ----------------------------------------------------------------------------------------------------
# Evaluation

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


def param_name(model: GPT) -> str:
    """Size as the paper names its models: total parameters, and active ones per token for MoE ("1.9B-A0.3B")."""
    def short(n: int) -> str:
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    total, active = model.num_params(), model.num_params(active=True)
    return short(total) if total == active else f"{short(total)}-A{short(active)}"


class StopOnSigint:
    """Ctrl-C asks the loop to stop after the current step, so that the checkpoint is consistent."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def format_time(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# ----------------------------------------------------------------------------------------------------

def setup(args: argparse.Namespace, ckpt: dict | None = None) -> dict:
    """Everything that can fail on bad user input, before anything is written. Raises ValueError."""
    check_out_dir(args.out_dir)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.compile:
        check_compile(device)
    rank, world_size = torchrun_rank(device)
    n = ckpt.get("world_size", 1) if ckpt is not None else world_size
    if n != world_size:
        raise ValueError(f"the checkpoint in {args.out_dir} was written by {n} process{'es' * (n > 1)}, this run "
                         f"has {world_size}; an exact continuation needs the same number: resume with "
                         + (f"torchrun --nproc_per_node={n}" if n > 1 else "python, not torchrun"))
    dataset = load_dataset(args.data, args.tokenizer, args.block_size)
    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=dataset.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, n_expert=args.n_expert, top_k=args.top_k,
                       n_shared=args.n_shared, n_dense_layers=args.n_dense_layers,
                       aux_loss_coef=args.aux_loss_coef, z_loss_coef=args.z_loss_coef)
    model = GPT(config)
    nitp = None
    if args.nitp:
        nitp = NITP(NITPConfig(lam=args.nitp_lambda, layer=args.nitp_layer, shift=args.nitp_shift,
                               stopgrad=not args.nitp_no_stopgrad, head=args.nitp_head, loss=args.nitp_loss,
                               start=args.nitp_start), args.n_layer, args.n_embd)
    model.to(device)
    if nitp is not None:
        nitp.to(device)
    optimizer = make_optimizer([model] + ([nitp] if nitp else []), args, device)
    scaler = grad_scaler(device, dtype)
    batch_rng = torch.Generator().manual_seed(args.seed)
    start_step = 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            if nitp is not None:
                nitp.load_state_dict(ckpt["nitp"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            batch_rng.set_state(ckpt["rng"]["batches"])
            torch.set_rng_state(ckpt["rng"]["torch"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"the checkpoint in {args.out_dir} does not fit this model "
                             f"({str(e).splitlines()[0][:120]}); start a new run in another --out-dir") from None
        start_step = ckpt["step"]
    return dict(args=args, device=device, dtype=dtype, dataset=dataset, config=config, model=model, nitp=nitp,
                optimizer=optimizer, scaler=scaler, batch_rng=batch_rng, start_step=start_step,
                rank=rank, world_size=world_size)


def train(run: dict, on_eval=None, sample: bool = True) -> list[dict]:
    """Train to args.max_iters; returns the evaluation records. on_eval(record) is called after each one."""
    args, device, dataset = run["args"], run["device"], run["dataset"]
    model, nitp, optimizer, scaler = run["model"], run["nitp"], run["optimizer"], run["scaler"]
    batch_rng, rank, world_size = run["batch_rng"], run["rank"], run["world_size"]
    master = rank == 0  # under DDP only rank 0 prints, evaluates, samples and writes files
    out_dir = Path(args.out_dir)
    metrics_path, ckpt_path = out_dir / "metrics.jsonl", out_dir / "ckpt.pt"
    step = run["start_step"]
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        if step == 0:
            metrics_path.write_text("")
        else:  # forget what was logged after the checkpoint: those steps are about to be redone
            lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
            metrics_path.write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= step))
    autocast = autocast_for(device, run["dtype"])
    compiled = torch.compile(model) if args.compile else model
    loss_fn = TrainingLoss(compiled, nitp)
    if world_size > 1:
        # Some steps leave parameters without a gradient (the NITP head before --nitp-start, MoE experts that
        # got no token): DDP must look for them in every step, or it stops with an error.
        unused = (nitp is not None and nitp.config.start > 0) or run["config"].n_expert > 1
        loss_fn = DDP(loss_fn, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=unused)

    val_rng = torch.Generator().manual_seed(0)  # the same validation batches at every eval and in every run
    val_batches = [tuple(to_device(t, device) for t in get_batch(dataset.val, args.batch_size, args.block_size, val_rng))
                   for _ in range(args.eval_iters)]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tokens_per_step = args.batch_size * args.grad_accum * args.block_size * world_size
    n_head = sum(p.numel() for p in nitp.parameters()) if nitp else 0
    if master:
        print(f"model: {param_name(model)} parameters"
              + (f" + NITP head {n_head / 1e6:.2f}M (training only), target block {nitp.layer}" if nitp else "")
              + f" | {len(dataset.train):,} train / {len(dataset.val):,} val tokens | {device}, "
              + str(run["dtype"]).removeprefix("torch.")
              + (f" x {world_size} processes" if world_size > 1 else ""))

    def log(record: dict) -> None:
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # Each step's loss terms stay on the device until a log line or the metrics file needs them: then the
    # steps logged since are fetched in one transfer, not one wait for the GPU per number.
    pending = []  # (record, names, values on the device) of the steps not yet written

    def flush() -> dict | None:
        """Write the pending steps to metrics.jsonl; returns the last one."""
        flat = torch.cat([values for _, _, values in pending]).tolist() if pending else []
        record = None
        for record, names, values in pending:
            record.update(zip(names, flat[:len(names)]))
            del flat[:len(names)]
            if not math.isfinite(record["grad_norm"]):  # only with fp16: the scaler skipped this step
                record.update(grad_norm=None, skipped=True)
            log(record)
        pending.clear()
        return record

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_path, {
            "format_version": CHECKPOINT_VERSION, "step": step,
            "model": model.state_dict(), "nitp": nitp.state_dict() if nitp else None,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "world_size": world_size,
            "model_config": asdict(run["config"]), "args": vars(args),
            "rng": {"batches": batch_rng.get_state(), "torch": torch.get_rng_state()},
            "command": sys.argv, "versions": {"torch": str(torch.__version__), "numpy": np.__version__,
                                              "tiktoken": tiktoken.__version__, "python": sys.version.split()[0]}})

    evals, step_ms = [], []  # step_ms: the duration of each training step since the last evaluation

    def run_eval(step: int) -> None:
        t0 = time.perf_counter()
        result = evaluate(compiled, nitp, val_batches, autocast)
        result = {"step": step, "eval": True, **result, "eval_s": time.perf_counter() - t0,
                  "ms_per_iter": float(np.mean(step_ms)) if step_ms else None}
        step_ms.clear()
        log(result)
        evals.append(result)
        val_nitp = f"{result['val_nitp']:.4f}" if result["val_nitp"] is not None else "-"
        print(f"eval step {step:5d} | val lm {result['val_lm']:.4f} | val nitp {val_nitp} | "
              f"erank {result['erank']:.1f} | anisotropy {result['anisotropy']:.3f}")
        for layer, share in enumerate(result.get("expert_share", [])):
            print(f"  MoE layer {layer + 1}: expert shares " + " ".join(f"{100 * s:.0f}%" for s in share))
        if "max_load" in result:
            print(f"  routing balance: busiest expert gets {result['max_load']:.2f}x its fair share (1.00 = even)")
        if on_eval is not None:
            on_eval(result)

    if step == 0 and master:
        run_eval(0)
    with StopOnSigint() as sigint:
        while step < args.max_iters:
            t_step = time.perf_counter()
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            parts_sum = {}
            for micro in range(args.grad_accum):
                x, y = (to_device(t, device) for t in get_shard(dataset.train, args.batch_size, args.block_size,
                                                                batch_rng, rank, world_size))
                # DDP averages the gradients across ranks once per step, in the last micro-batch's backward
                no_sync = loss_fn.no_sync if world_size > 1 and micro < args.grad_accum - 1 else contextlib.nullcontext
                with no_sync():
                    with autocast:
                        loss, parts = loss_fn(x, y, step)
                    scaler.scale(loss / args.grad_accum).backward()
                for name, value in [("loss", loss), *parts.items()]:
                    parts_sum[name] = parts_sum.get(name, 0.0) + value.detach().float() / args.grad_accum
            scaler.unscale_(optimizer)  # the true gradients, to clip and to guard (nothing to undo unless fp16)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)  # inf: measure only
            names, terms = list(parts_sum), torch.stack(list(parts_sum.values()))  # (n_terms,) on the device
            # Under fp16, inf gradients are the scaler's to handle (it skips the step and lowers the scale);
            # in bf16 and fp32 they are a divergence, like a non-finite loss.
            guarded = terms if scaler.is_enabled() else torch.cat([terms, grad_norm.reshape(1)])
            terms, bad, interrupted = sync_step(terms, guarded, sigint.requested, world_size)
            values = torch.cat([terms, grad_norm.reshape(1).float()])  # (n_terms + 1,)
            if bad:  # stop before the update: the weights and the last checkpoint stay good
                flush()
                found = dict(zip(names + ["grad_norm"], values.tolist()))
                if scaler.is_enabled():
                    del found["grad_norm"]
                raise Diverged(f"step {step + 1}: {first_non_finite(found)}; stopped before the update, "
                               f"{ckpt_path} is untouched (a new run with a lower --learning-rate usually avoids this)")
            scaler.step(optimizer)  # = optimizer.step(), except under fp16 (where the scaler reads its inf flag)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_ms.append(1000 * (time.perf_counter() - t_step))  # sync_step waited for the device
            pending.append(({"step": step, "lr": lr, "ms": step_ms[-1]}, names + ["grad_norm"], values))

            if step % args.log_interval == 0 or step == args.max_iters:
                last = flush()
                if master:
                    ms = float(np.mean(step_ms[-args.log_interval:]))
                    shown = " | ".join(f"{k} {last[k]:.4f}" for k in names)
                    print(f"step {step:5d}/{args.max_iters} | {shown} | lr {lr:.2e} | {ms:.0f} ms/iter | "
                          f"{tokens_per_step / ms:.1f}k tok/s | left {format_time(ms / 1000 * (args.max_iters - step))}")
            if step % args.eval_interval == 0 or step == args.max_iters:
                flush()
                if master:
                    run_eval(step)
                    checkpoint(step)
            if interrupted:
                flush()
                if master:
                    checkpoint(step)
                    launcher = f"torchrun --standalone --nproc_per_node={world_size}" if world_size > 1 else "python"
                    print(f"interrupted: saved step {step} to {ckpt_path}; continue with: "
                          f"{launcher} train.py --resume --out-dir {args.out_dir}")
                sys.exit(130)  # the shell's code for Ctrl-C, on every rank: a caller (--compare, a script) must not go on

    if master and sample:
        prompt = torch.tensor([dataset.tokenizer.encode_ordinary("\n")], device=device)
        text = model.generate(prompt, max_new_tokens=300, temperature=0.8, top_k=50)[0].tolist()
        print("sample:\n" + dataset.tokenizer.decode(text, errors="replace"))
    return evals


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        ckpt = None
        if args.resume or args.probe:  # the run's settings come from its checkpoint, except what flags may change
            ckpt = load_checkpoint(args.out_dir)
            args = parse_args(argv, saved=ckpt["args"])
        # Everything is checked before anything runs: with --compare, the NITP settings too, before NTP trains.
        run = setup(argparse.Namespace(**{**vars(args), "nitp": args.nitp or args.compare}), ckpt)
    except ValueError as e:  # config, data, device, output folder and checkpoint problems: the user's to fix
        fail(str(e))
    if args.probe:
        sections = labelled_sections(args.data, run["dataset"].tokenizer)
        rows = probe.report({"this model": run["model"]}, sections, args.block_size, args.seed)
        (Path(args.out_dir) / "probe.json").write_text(json.dumps(rows, indent=1))
        return
    if run["world_size"] > 1:
        dist.init_process_group("nccl" if run["device"].type == "cuda" else "gloo")
    try:
        if args.compare:
            compare(args, setup, train)  # its own runs, in OUT_DIR/seed<S>-ntp|nitp: not a third one here
        else:
            train(run)
    except Diverged as e:
        fail(str(e), status=3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
