"""Train a small GPT with next-token prediction (NTP), or with NTP + NITP.

    python train.py            # the NTP baseline
    python train.py --nitp     # the same run with the NITP loss added
    python compare.py          # both, side by side, over three seeds
    torchrun --standalone --nproc_per_node=8 train.py --nitp   # data-parallel (DDP) over 8 GPUs

Every run writes OUT_DIR/metrics.jsonl (one line per step, one per evaluation) and OUT_DIR/ckpt.pt.
Exit status: 0 done; 2 bad input; 3 a loss term or the gradient norm became NaN or infinite (the checkpoint
keeps the last good state); 130 interrupted with Ctrl-C, after saving a checkpoint to resume from.

Read it top to bottom: the settings, `main`, the run and its set-up, the loop, one step, the evaluation. What a
run on one CPU does not need (devices and precision, torchrun's set-up, checkpoints and resume, the checks of
the command line) is in machinery.py, called by name: skip it on a first reading.
"""
import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import machinery
from data import Dataset, every_window, get_batch, get_tokenizer, load_dataset
from model import GPT, GPTConfig, model_size
from nitp import NITP, Geometry, NITPConfig, TrainingLoss, diagnostics, target_layer

# ----------------------------------------------------------------------------------------------------
# Settings: the defaults of every run. Edit them here, or override any with its flag: nitp_lambda is
# --nitp-lambda (`python train.py --nitp --max-iters 200`); `python train.py --help` lists them all. The command
# line is built from these lines (machinery.make_parser reads `name = default  # help`, and a `# heading` line
# names a group of flags); the code reads the values from `args`. The defaults are the classroom setting,
# chosen and checked on fresh seeds (RESULTS.md). compare.py, ablations.py and bench.py take the same flags.

# NITP
nitp = False                # add the NITP loss (without it: the NTP baseline)
nitp_lambda = 1.0           # λ, the weight of the NITP loss
nitp_layer = None           # target block k (0 = embeddings); None: round(0.2 * n_layer), at least 1
nitp_shift = 1              # ablation: 1 predicts z_{t+1} (NITP), 0 predicts z_t (same position)
nitp_no_stopgrad = False    # ablation: let gradients flow into the target
nitp_head = "swiglu"        # ablation: the projection head P
nitp_head_width = None      # the SwiGLU head's hidden width; None: 4 * n_embd, the paper's (smaller costs less)
nitp_loss = "cosine"        # ablation: the distance between P(h) and z
nitp_start = 0              # ablation: the step at which the NITP loss switches on
nitp_shuffled_target = False  # control: each target z comes from a random other position (NITP's form, no content)
# data
data = "python-docs"        # 'python-docs' (the Python reference, in corpus/), 'shakespeare' (downloaded once)
                            # or a path to a UTF-8 text file
tokenizer = "bytes"         # 'bytes' (256 tokens, offline) or a standard tiktoken encoding
# model
n_layer = 4                 # number of transformer blocks
n_head = 4                  # attention heads per block
n_embd = 128                # model width d
block_size = 64             # context length in tokens
# mixture of experts
n_expert = 1                # routed experts per MoE layer (1 = dense MLP)
top_k = 1                   # experts each token is routed to
n_shared = 0                # always-on shared experts per MoE layer
n_dense_layers = 1          # first blocks that stay dense when --n-expert > 1
aux_loss_coef = 0.01        # weight of the load-balancing loss
z_loss_coef = 0.0           # weight of the router z-loss (0 = off)
# training
max_iters = 1000            # optimizer steps in total
batch_size = 16             # sequences per micro-batch, per process under torchrun
grad_accum = 1              # micro-batches per optimizer step
learning_rate = 2e-3        # peak learning rate (AdamW, betas 0.9 and 0.95; cosine decay to a tenth)
warmup_iters = None         # steps of linear warm-up before the cosine decay; None: a tenth of --max-iters
weight_decay = 0.1          # AdamW weight decay on matrices
grad_clip = 1.0             # clip the gradient norm to this (0 = off: measured only)
seed = 1337                 # seed for the weights and the batch order
# evaluation and output
eval_interval = None        # evaluate and checkpoint every this many steps; None: a tenth of --max-iters
eval_iters = 10             # validation batches per evaluation during training (the last reads all of it)
log_interval = 20           # print a progress line every this many steps
out_dir = "out"             # where metrics.jsonl and ckpt.pt go
resume = False              # continue the run whose checkpoint is in --out-dir (only --max-iters,
                            # --eval-interval, --eval-iters, --log-interval and the system flags may change)
# system (DEVICES.md)
device = "auto"             # 'auto' (cuda, then mps, then cpu), or a torch device name
dtype = "auto"              # 'auto': bfloat16 on CUDA GPUs that have it natively, float16 on older ones,
                            # float32 on the CPU and MPS; bfloat16/float16 train under autocast; float32 on
                            # CUDA does its matmuls in TF32
compile = False             # compile the model with torch.compile (CUDA, CPU)
deterministic = False       # torch's deterministic algorithms: on CUDA, runs and resumes that repeat bit for bit,
                            # somewhat slower (the CPU is deterministic without it)

# ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    args = machinery.parse_args(argv)
    try:  # every input that can be wrong is checked here, before anything is written
        machinery.check_out_dir(args.out_dir)
        ckpt = None
        if args.resume:  # the run's settings come from its checkpoint, except what flags may change
            ckpt = machinery.load(args.out_dir)
            args = machinery.parse_args(argv, saved=ckpt["args"])
        run = setup(args, ckpt)
    except ValueError as e:  # config, data, device, output folder and checkpoint problems: the user's to fix
        machinery.fail(str(e))
    if run.world_size > 1:
        dist.init_process_group("nccl" if run.device.type == "cuda" else "gloo")
    try:
        train(run)
    except Diverged as e:
        machinery.fail(str(e), status=3)
    except Interrupted as e:
        machinery.say(str(e), sys.stdout)
        sys.exit(130)  # the shell's code for Ctrl-C: a caller (a script, compare.py's next run) must not go on
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# A run: the model and the NITP head, the optimizer, the data, and all the state that a checkpoint saves

@dataclass
class Run:
    args: argparse.Namespace
    device: torch.device
    precision: machinery.Precision  # autocast and float16's gradient scaler; in float32, neither does anything
    dataset: Dataset
    model: GPT
    nitp: NITP | None               # the projection head and the NITP loss; None for NTP
    optimizer: torch.optim.AdamW
    batch_rng: torch.Generator      # the order of the training batches: seeded, saved, restored
    step: int = 0                   # optimizer steps done
    rank: int = 0                   # this process under torchrun; rank 0 logs, evaluates and writes
    world_size: int = 1

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def setup(args: argparse.Namespace, ckpt: dict | None = None) -> Run:
    """A new run, or with `ckpt` the run it saved. Every setting that can be wrong (the device, the dtype, the
    model, the data, the checkpoint) raises ValueError here, before anything but the token cache is written."""
    if args.deterministic:
        machinery.use_deterministic_algorithms()  # before the first kernel
    device = machinery.pick_device(args.device)
    dtype = machinery.pick_dtype(args.dtype, device)
    if args.compile:
        machinery.check_compile(device)
    rank, world_size = machinery.torchrun_rank(device)
    if ckpt is not None:
        machinery.check_world_size(ckpt, world_size, args.out_dir)
    vocab_size = get_tokenizer(args.tokenizer).n_vocab
    model_cfg, nitp_cfg = model_config(args, vocab_size), nitp_config(args)  # checked before the data loads
    dataset = load_dataset(args.data, get_tokenizer(args.tokenizer), args.block_size)

    torch.manual_seed(args.seed)
    model = GPT(model_cfg).to(device)
    # Built after the backbone, from the same seed: NTP and NITP runs of one seed start from the same weights.
    head = NITP(nitp_cfg, args.n_layer, args.n_embd).to(device) if nitp_cfg else None
    params = {id(p): p for m in [model] + ([head] if head else []) for p in m.parameters()}.values()  # tied: once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},  # matrices only
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95),
                                  **machinery.optimizer_kernels(device))
    run = Run(args, device, machinery.Precision(device, dtype), dataset, model, head, optimizer,
              torch.Generator().manual_seed(args.seed), rank=rank, world_size=world_size)
    if ckpt is not None:
        run.step = machinery.restore(ckpt, model=model, head=head, optimizer=optimizer,
                                     scaler=run.precision.scaler, batch_rng=run.batch_rng, out_dir=args.out_dir)
    return run


def model_config(args: argparse.Namespace, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                     n_embd=args.n_embd, n_expert=args.n_expert, experts_per_token=args.top_k,
                     n_shared=args.n_shared, n_dense_layers=args.n_dense_layers, aux_loss_coef=args.aux_loss_coef,
                     z_loss_coef=args.z_loss_coef)


def nitp_config(args: argparse.Namespace) -> NITPConfig | None:
    """The NITP settings of --nitp and its ablation flags, checked; None without --nitp."""
    if not args.nitp:
        return None
    config = NITPConfig(lam=args.nitp_lambda, layer=args.nitp_layer, shift=args.nitp_shift,
                        stopgrad=not args.nitp_no_stopgrad, head=args.nitp_head, head_width=args.nitp_head_width,
                        loss=args.nitp_loss, start=args.nitp_start, shuffled=args.nitp_shuffled_target)
    target_layer(config, args.n_layer)  # in range for this depth
    return config


def training_loss(run: Run) -> torch.nn.Module:
    """What a step calls: L = L_NTP + λ·L_NITP from one pass of the backbone (nitp.TrainingLoss), on the compiled
    model with --compile; under torchrun wrapped in DDP, which averages the gradients of every process's backward."""
    model = machinery.compiled(run.model) if run.args.compile else run.model
    loss_fn = TrainingLoss(model, run.nitp)
    if run.world_size > 1:
        # Before --nitp-start the head gets no gradient, and DDP must then look for unused parameters in every
        # step (a graph traversal), or it stops with an error. MoE experts need no search: an expert that got no
        # token still runs, on an empty chunk, and gets a zero gradient.
        head_idle = run.nitp is not None and run.nitp.config.start > 0
        loss_fn = DDP(loss_fn, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                      find_unused_parameters=head_idle)
    return loss_fn


def save(run: Run) -> None:
    """OUT_DIR/ckpt.pt: all that --resume needs to continue the run bit for bit."""
    machinery.save(Path(run.args.out_dir) / "ckpt.pt", step=run.step, world_size=run.world_size, args=run.args,
                   model=run.model, head=run.nitp, optimizer=run.optimizer, scaler=run.precision.scaler,
                   batch_rng=run.batch_rng)


# ----------------------------------------------------------------------------------------------------
# The loop

class Diverged(Exception):
    """A loss term or the gradient norm is NaN or infinite: no update from here on can be trusted."""


class Interrupted(Exception):
    """Ctrl-C: the run stopped after a step and saved a checkpoint to resume from."""


def train(run: Run, on_eval=None, sample: bool = True) -> list[dict]:
    """Train to args.max_iters; returns the evaluation records. on_eval(record) is called after each one.
    Raises Diverged (nothing saved after the last good checkpoint) or Interrupted (a checkpoint saved)."""
    args, master = run.args, run.rank == 0  # under torchrun only rank 0 prints, evaluates, samples and writes
    metrics = Path(args.out_dir) / "metrics.jsonl"
    loss_fn = training_loss(run)
    during = validation_batches(run.dataset.val, args.batch_size, args.block_size, run.device, args.eval_iters)
    evaluations, step_ms = [], []  # step_ms: how long each step since the last evaluation took

    def log(record: dict) -> None:  # a line of metrics.jsonl
        if master:
            with open(metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluation() -> None:  # rank 0 only; the last one reads the whole held-out text
        t0 = time.perf_counter()
        whole = run.step == args.max_iters
        batches = validation_batches(run.dataset.val, args.batch_size, args.block_size, run.device) if whole else during
        record = {"step": run.step, "eval": True, "whole_split": whole,
                  **evaluate(run, loss_fn.module if run.world_size > 1 else loss_fn, batches, during[0])}
        record.update(eval_s=time.perf_counter() - t0, ms_per_iter=float(np.mean(step_ms)) if step_ms else None)
        step_ms.clear()
        log(record)
        evaluations.append(record)
        val_nitp = f"{record['val_nitp']:.4f}" if record["val_nitp"] is not None else "-"
        print(f"eval step {record['step']:5d} | val lm {record['val_lm']:.4f} | val nitp {val_nitp} | "
              f"erank {record['erank']:.1f} | anisotropy {record['anisotropy']:.3f}"
              + (" | the whole held-out text" if whole else ""))
        for layer, share in enumerate(record.get("expert_share", [])):
            print(f"  MoE layer {layer + 1}: expert shares " + " ".join(f"{100 * s:.0f}%" for s in share))
        if "max_load" in record:
            print(f"  routing balance: busiest expert gets {record['max_load']:.2f}x its fair share (1.00 = even)")
        if "nitp_cos" in record:
            print(f"  NITP: cos(P(h), z) {record['nitp_cos']:.3f} (the mean direction's "
                  f"{record['nitp_cos_mean_direction']:.3f}) | |P(h)| {record['pred_norm']:.2f} | "
                  f"|z| {record['target_norm']:.2f} | share of the backbone gradient {record['grad_nitp_share']:.1%} "
                  f"(cos to the LM's {record['grad_cos']:+.2f})")
        if on_eval is not None:
            on_eval(record)

    if master:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        machinery.start_metrics(metrics, run.step)  # a resumed run forgets the steps logged after its checkpoint
        head = sum(p.numel() for p in run.nitp.parameters()) if run.nitp else 0
        print(f"model: {model_size(run.model)} parameters"
              + (f" + NITP head {head / 1e6:.2f}M (training only), target block {run.nitp.layer}" if run.nitp else "")
              + f" | {len(run.dataset.train):,} train / {len(run.dataset.val):,} val tokens | {run.device}, "
              + str(run.precision.dtype).removeprefix("torch.")
              + (" (matmuls in TF32)" if run.device.type == "cuda" and run.precision.dtype == torch.float32 else "")
              + (f" x {run.world_size} processes" if run.world_size > 1 else ""))
        print(f"data: {run.dataset.about}")
        if run.step == 0:
            evaluation()
    with machinery.StopOnSigint() as sigint:
        while run.step < args.max_iters:
            t0 = time.perf_counter()
            step = train_step(run, loss_fn, sigint)
            ms = 1000 * (time.perf_counter() - t0)  # train_step waited for the device
            step_ms.append(ms)
            log({"step": step.number, "lr": step.lr, "ms": ms, **step.values})
            last = step.number == args.max_iters
            if master and (step.number % args.log_interval == 0 or last):
                ms = float(np.mean(step_ms[-args.log_interval:]))
                tokens_per_step = args.batch_size * args.grad_accum * args.block_size * run.world_size
                left = ms / 1000 * (args.max_iters - step.number)
                losses = " | ".join(f"{k} {v:.4f}" for k, v in step.values.items() if k not in ("grad_norm", "skipped"))
                print(f"step {step.number:5d}/{args.max_iters} | {losses} | lr {step.lr:.2e} | {ms:.0f} ms/iter | "
                      f"{tokens_per_step / ms:.1f}k tok/s | left {int(left // 60)}m{int(left % 60):02d}s")
            if master and (step.number % args.eval_interval == 0 or last):
                evaluation()
                save(run)
            if step.interrupted:
                if master:
                    save(run)
                raise Interrupted(f"interrupted: saved step {step.number} to {metrics.parent / 'ckpt.pt'}; continue "
                                  f"with: {machinery.launcher(run.world_size)} train.py --resume "
                                  f"--out-dir {args.out_dir}")
    if master and sample:
        prompt = torch.tensor([run.dataset.tokenizer.encode_ordinary("\n")], device=run.device)
        text = run.model.generate(prompt, max_new_tokens=300, temperature=0.8, top_k=50)[0].tolist()
        print("sample:\n" + run.dataset.tokenizer.decode(text, errors="replace"))
    return evaluations


# ----------------------------------------------------------------------------------------------------
# One training step (bench.py times this same function)

@dataclass
class Step:
    """What one optimizer step leaves for the log."""
    number: int               # steps done, counting this one: 1 for the first
    lr: float
    values: dict[str, float]  # "loss" (the total), its parts ("lm", "nitp", "moe_aux"), "grad_norm": averaged
                              # over the micro-batches and the processes; float16's skipped steps say so
    interrupted: bool         # Ctrl-C in some process: every process stops after this step


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to the peak, then cosine decay to a tenth of it at max_iters."""
    if step < args.warmup_iters:
        return args.learning_rate * (step + 1) / args.warmup_iters
    progress = (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    min_lr = args.learning_rate / 10
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (args.learning_rate - min_lr)


def train_step(run: Run, loss_fn: torch.nn.Module, sigint=None) -> Step:
    """One optimizer step: the learning rate, --grad-accum micro-batches, the gradient clip, the NaN guard and
    the update. It waits for the device once, to read the losses and the guard. Raises Diverged, before the
    update, if a loss term or the gradient norm is not finite; the weights then stay those of the last good step."""
    args, optimizer, scaler = run.args, run.optimizer, run.precision.scaler  # scaler: float16's; else it passes through
    ddp = run.world_size > 1
    lr = lr_at(run.step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    terms = 0  # (n_terms,) the loss and its parts, averaged over the micro-batches; on the device
    for micro in range(args.grad_accum):
        # Under torchrun every process draws the same global batch and keeps its own rows: together they see the
        # batches of one process with world_size times the batch, and resuming stays exact.
        x, y = get_batch(run.dataset.train, run.world_size * args.batch_size, args.block_size, run.batch_rng)
        if ddp:
            mine = slice(run.rank * args.batch_size, (run.rank + 1) * args.batch_size)
            x, y = x[mine], y[mine]  # (B, T) each
        x, y = machinery.to_device(x, run.device), machinery.to_device(y, run.device)
        if ddp:  # average the gradients across the processes once per step: in the last micro-batch's backward
            loss_fn.require_backward_grad_sync = micro == args.grad_accum - 1
        with run.precision.autocast:
            loss, parts = loss_fn(x, y, run.step)  # L = L_NTP + λ·L_NITP, and its parts: nitp.TrainingLoss
        scaler.scale(loss / args.grad_accum).backward()  # float16: scaled up, so that small gradients survive
        terms = terms + torch.stack([loss, *parts.values()]).detach().float() / args.grad_accum
    scaler.unscale_(optimizer)  # the true gradients, to clip and to guard
    # --grad-clip 0 measures the norm only: an infinite bound scales the gradients by exactly 1
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.grad_clip or math.inf)
    # The one read of the device: the loss terms, and two flags that every process must agree on, or the others
    # hang: did a guarded value become NaN or inf, did Ctrl-C come (read as late as possible)?
    guarded = terms if scaler.is_enabled() else torch.cat([terms, grad_norm.reshape(1)])  # float16: the scaler
    not_finite = (~torch.isfinite(guarded)).any().float()                                 # skips inf gradients
    stop = torch.full_like(not_finite, float(sigint is not None and sigint.requested))
    shared = torch.cat([terms, not_finite.reshape(1), stop.reshape(1)])  # (n_terms + 2,)
    if ddp:
        dist.all_reduce(shared)  # a sum over the processes (gloo has no mean): a flag > 0 means "in some process"
        shared[:len(terms)] /= run.world_size
    *numbers, grad_norm, bad, interrupted = torch.cat([shared[:-2], grad_norm.reshape(1).float(), shared[-2:]]).tolist()
    values = dict(zip(["loss", *parts, "grad_norm"], [*numbers, grad_norm]))
    if bad:  # stop before the update: the weights and the last checkpoint stay good
        watched = [(f"the {k} loss", v) for k, v in values.items() if k not in ("loss", "grad_norm")]
        watched += [("the total loss", values["loss"])] + [("the gradient norm", grad_norm)] * (not scaler.is_enabled())
        what = next(f"{name} is {value}" for name, value in watched if not math.isfinite(value))
        raise Diverged(f"step {run.step + 1}: {what}; stopped before the update, {Path(args.out_dir) / 'ckpt.pt'} "
                       f"is untouched (a new run with a lower --learning-rate usually avoids this)")
    if not math.isfinite(grad_norm):  # only under float16: the scaler skips this update
        values.update(grad_norm=None, skipped=True)
    scaler.step(optimizer)  # optimizer.step(), unless float16's gradients overflowed
    scaler.update()         # float16: the scale grows after good steps, halves after a skipped one
    optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return Step(run.step, lr, values, bool(interrupted))


# ----------------------------------------------------------------------------------------------------
# The evaluation: the validation loss, and the geometry that NITP claims to change

def validation_batches(tokens: np.ndarray, batch_size: int, block_size: int, device: torch.device,
                       n_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out text in batches of windows, each window once (data.every_window): all of it, every token a
    target once, when n_batches is None (the final evaluation); else n_batches batches of windows spread evenly
    over it (the evaluations during training, which need only follow the curve). The same in every run, so that
    the NTP and NITP runs of compare.py are measured on exactly the same tokens."""
    (x, y), *rest = every_window(tokens, block_size)      # (W, T) each, and the shorter rest: (1, r) each
    if n_batches is not None:
        picked = torch.linspace(0, len(x) - 1, min(len(x), n_batches * batch_size)).round().long()
        x, y, rest = x[picked], y[picked], []
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)] + rest
    return [(machinery.to_device(x, device), machinery.to_device(y, device)) for x, y in batches]


@torch.no_grad()
def evaluate(run: Run, loss_fn: TrainingLoss, val_batches, diagnostics_batch=None) -> dict:
    """The pure LM validation loss, the NITP loss, and the geometry of the hidden states, on every window of
    val_batches: `erank` and `anisotropy` of the final hidden states (the LM head's input, the vector NITP trains),
    `erank_by_layer` of every block's output ([0] the embeddings), and how many targets and states they used. NITP's
    diagnostics read one batch: diagnostics_batch, the same at every evaluation (default: the first)."""
    model = loss_fn.model  # compiled with --compile
    model.eval()
    lm_sum = nitp_sum = targets = pairs = 0.0
    expert_shares = []
    final, by_layer = Geometry(), [Geometry() for _ in range(run.model.config.n_layer + 1)]
    for x, y in val_batches:  # (B, T) each; the last batch of the whole split may be shorter
        with run.precision.autocast:
            out = model(x, y)
            lm_sum += out.loss.float() * y.numel()                # the loss is a mean: weigh it by its targets
            targets += y.numel()
            if run.nitp is not None:
                n_pairs = x.size(0) * (x.size(1) - run.nitp.config.shift)
                nitp_sum += run.nitp(out.hidden, out.block_outputs[run.nitp.layer]).float() * n_pairs
                pairs += n_pairs
        if out.expert_share is not None:
            expert_shares.append(out.expert_share)  # (n_moe_layers, E)
        final.add(out.hidden)                       # (B, T, d): B windows of T states
        for geometry, z in zip(by_layer, out.block_outputs):
            geometry.add(z)
    model.train()
    record = {"val_lm": (lm_sum / targets).item(),
              "val_nitp": (nitp_sum / pairs).item() if run.nitp is not None else None,
              "erank": final.effective_rank(), "anisotropy": final.anisotropy(),
              "erank_by_layer": [geometry.effective_rank() for geometry in by_layer],
              "val_targets": int(targets), "geometry_states": final.n, "geometry_windows": final.windows}
    if expert_shares:  # each expert's share of the routed slots, per MoE layer; ideal is 1/E each
        share = torch.stack(expert_shares).mean(dim=0)  # (n_moe_layers, E)
        record.update(expert_share=share.tolist(), max_load=(share.max() * share.size(1)).item())  # 1 = balanced
    if run.nitp is not None:  # on the eager model: gradients in eval mode would make --compile recompile
        record.update(diagnostics(run.model, run.nitp, *(diagnostics_batch or val_batches[0]), run.precision.autocast,
                                  loss_scale=run.precision.scaler.get_scale()))  # 1.0 but under float16
    return record


if __name__ == "__main__":
    machinery.printable_output()  # before anything prints: a console that cannot hold a character must not crash
    main()
