"""Train a small GPT with next-token prediction (NTP), or with NTP + NITP.

    python train.py            # the NTP baseline
    python train.py --nitp     # the same run with the NITP loss added
    python compare.py          # both, side by side, over three seeds
    torchrun --standalone --nproc_per_node=8 train.py --nitp   # data-parallel (DDP) over 8 GPUs

Every run writes OUT_DIR/metrics.jsonl (one line per step, one per eval) and OUT_DIR/ckpt.pt.
Exit status: 0 done; 2 bad input; 3 a loss term or the gradient norm became NaN or infinite (the checkpoint
keeps the last good state); 130 interrupted with Ctrl-C, after saving a checkpoint to resume from.

Reading order: `main` at the bottom, then `setup` (a Run), `train` (the loop) and `train_step` (one step).
"""
import argparse
import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import devices
from data import Dataset, get_batch, get_tokenizer, load_dataset
from evaluate import evaluate, model_size, nitp_diagnostics, print_evaluation, validation_batches
from flags import check_out_dir, fail, parse_args, say
from model import GPT, GPTConfig, MoE
from nitp import NITP, NITPConfig, target_layer, training_loss

# ----------------------------------------------------------------------------------------------------
# A run: everything one training run holds, built and checked before anything is written

@dataclass
class Settings:
    """What a run's flags ask for, checked: where it runs, on which tokens, with which model."""
    device: torch.device
    dtype: torch.dtype
    rank: int
    world_size: int
    dataset: Dataset
    model: GPTConfig
    nitp: NITPConfig | None


@dataclass
class Run:
    """One training run: its settings, its model and head, and all the state that a checkpoint saves."""
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    dataset: Dataset
    model: GPT
    nitp: NITP | None
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler
    batch_rng: torch.Generator  # the order of the training batches: seeded, saved, restored
    step: int = 0               # optimizer steps done
    rank: int = 0               # this process under torchrun; rank 0 logs, evaluates and writes
    world_size: int = 1

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def check(args: argparse.Namespace, ckpt: dict | None = None) -> Settings:
    """Everything about the run that can fail on bad user input, checked before anything is written (but the
    out dir: main checks that). Raises ValueError."""
    if args.deterministic:
        devices.use_deterministic_algorithms()  # before the first kernel
    device = devices.pick_device(args.device)
    dtype = devices.pick_dtype(args.dtype, device)
    if args.compile:
        devices.check_compile(device)
    rank, world_size = devices.torchrun_rank(device)
    if ckpt is not None:
        checkpoint.check_world_size(ckpt, world_size, args.out_dir)
    tokenizer = get_tokenizer(args.tokenizer)
    model, nitp = model_config(args, tokenizer.n_vocab), nitp_config(args)
    dataset = load_dataset(args.data, tokenizer, args.block_size)  # the first thing written: the token cache
    return Settings(device, dtype, rank, world_size, dataset, model, nitp)


def model_config(args: argparse.Namespace, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                     n_embd=args.n_embd, n_expert=args.n_expert, top_k=args.top_k, n_shared=args.n_shared,
                     n_dense_layers=args.n_dense_layers, aux_loss_coef=args.aux_loss_coef,
                     z_loss_coef=args.z_loss_coef)


def nitp_config(args: argparse.Namespace) -> NITPConfig | None:
    """The NITP settings of --nitp and its ablation flags, checked; None without --nitp."""
    if not args.nitp:
        return None
    config = NITPConfig(lam=args.nitp_lambda, layer=args.nitp_layer, shift=args.nitp_shift,
                        stopgrad=not args.nitp_no_stopgrad, head=args.nitp_head, head_width=args.nitp_head_width,
                        loss=args.nitp_loss, start=args.nitp_start)
    target_layer(config, args.n_layer)  # in range for this depth
    return config


def build(args: argparse.Namespace, settings: Settings) -> Run:
    """The model (seeded), the NITP head, the optimizer over both, the gradient scaler, the batch generator."""
    torch.manual_seed(args.seed)
    model = GPT(settings.model)
    # Built after the backbone, from the same seed: NTP and NITP runs of one seed start from the same weights.
    nitp = NITP(settings.nitp, args.n_layer, args.n_embd) if settings.nitp else None
    model.to(settings.device)
    if nitp is not None:
        nitp.to(settings.device)
    optimizer = make_optimizer([model] + ([nitp] if nitp else []), args, settings.device)
    return Run(args, settings.device, settings.dtype, settings.dataset, model, nitp, optimizer,
               devices.grad_scaler(settings.device, settings.dtype), torch.Generator().manual_seed(args.seed),
               rank=settings.rank, world_size=settings.world_size)


def setup(args: argparse.Namespace, ckpt: dict | None = None) -> Run:
    """A new run, or with `ckpt` the run it saved. Raises ValueError on bad input, before anything is written."""
    run = build(args, check(args, ckpt))
    if ckpt is not None:
        checkpoint.restore(run, ckpt)
    return run


def compiled(model: GPT) -> torch.nn.Module:
    """torch.compile(model), with each MoE layer left eager. Its dispatch splits the tokens by counts read from
    the device, which change every step: compiled, new counts kept recompiling it (TORCH_LOGS=recompiles), and
    past dynamo's limit of 8 recompiles that code would have run eager anyway, silently. Done here, not with a
    decorator on MoE.forward: torch.compiler.disable imports dynamo, about 2 s added to every start here."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.forward = torch.compiler.disable(module.forward)
    return torch.compile(model)


def make_optimizer(modules: list[torch.nn.Module], args, device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (2+ dims) only, never on norms and biases."""
    params = {id(p): p for m in modules for p in m.parameters()}.values()  # the tied weight once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), **devices.optimizer_kernels(device))


# ----------------------------------------------------------------------------------------------------
# One training step, shared by train() and bench.py

class Diverged(Exception):
    """A loss term or the gradient norm is NaN or infinite: no update from here on can be trusted."""


class Interrupted(Exception):
    """Ctrl-C: the run stopped after a step and saved a checkpoint to resume from."""


@dataclass
class Step:
    """What one optimizer step leaves for the log. `values` stay on the device until the log needs them."""
    number: int           # steps done, counting this one: 1 for the first
    lr: float
    names: list[str]      # "loss" (the total), its parts ("lm", "nitp", "moe_aux"), "grad_norm"
    values: torch.Tensor  # (len(names),) averaged over the micro-batches and the ranks
    interrupted: bool     # Ctrl-C on some rank: every rank stops after this step


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to the peak, then cosine decay to a tenth of it at max_iters."""
    if step < args.warmup_iters:
        return args.learning_rate * (step + 1) / args.warmup_iters
    progress = (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    min_lr = args.learning_rate / 10
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (args.learning_rate - min_lr)


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


def loss_module(run: Run, model: torch.nn.Module) -> torch.nn.Module:
    """What a step calls for its loss: the backbone `model` (run.model, or its compiled form) and the head,
    wrapped in DDP under torchrun."""
    loss_fn = TrainingLoss(model, run.nitp)
    if run.world_size > 1:
        # Before --nitp-start the head gets no gradient, and DDP must then look for unused parameters in every
        # step (a graph traversal), or it stops with an error. MoE experts need no search: an expert that got
        # no token still runs, on an empty chunk, and gets a zero gradient.
        head_idle = run.nitp is not None and run.nitp.config.start > 0
        loss_fn = DDP(loss_fn, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                      find_unused_parameters=head_idle)
    return loss_fn


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


def first_non_finite(values: dict[str, float]) -> str | None:
    """What went bad first, checking the parts of the loss (named as in training_loss) before their total, and
    the loss before the gradient norm: "the nitp loss is nan". None if everything is finite."""
    checks = [(f"the {name} loss", value) for name, value in values.items() if name not in ("loss", "grad_norm")]
    checks += [("the total loss", values["loss"])]
    checks += [("the gradient norm", values["grad_norm"])] if "grad_norm" in values else []
    return next((f"{what} is {value}" for what, value in checks if not math.isfinite(value)), None)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The total norm of the gradients, which are then clipped to max_norm; with max_norm 0 only measured."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    # not clip_grad_norm_(params, inf): it would still multiply every gradient by 1.0
    norms = [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


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


def train_step(run: Run, loss_fn: torch.nn.Module, autocast, sigint: StopOnSigint | None = None) -> Step:
    """One optimizer step: the learning rate, --grad-accum micro-batches, the gradient clip, the NaN guard and
    the update. It waits for the device once, in sync_step. Raises Diverged, before the update, if a loss term
    or the gradient norm is not finite; the weights then stay those of the last good step."""
    args, optimizer, scaler = run.args, run.optimizer, run.scaler
    lr = lr_at(run.step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = {}  # name -> this rank's mean over the micro-batches, on the device
    for micro in range(args.grad_accum):
        shard = get_shard(run.dataset.train, args.batch_size, args.block_size, run.batch_rng, run.rank, run.world_size)
        x, y = (devices.to_device(t, run.device) for t in shard)  # (B, T) each
        # DDP averages the gradients across ranks once per step, in the last micro-batch's backward
        accumulating = run.world_size > 1 and micro < args.grad_accum - 1
        with loss_fn.no_sync() if accumulating else contextlib.nullcontext():
            with autocast:
                loss, parts = loss_fn(x, y, run.step)
            scaler.scale(loss / args.grad_accum).backward()
        for name, value in [("loss", loss), *parts.items()]:
            sums[name] = sums.get(name, 0.0) + value.detach().float() / args.grad_accum
    scaler.unscale_(optimizer)  # the true gradients, to clip and to guard (nothing to undo unless fp16)
    grad_norm = clip_gradients(run.params, args.grad_clip)
    terms = torch.stack(list(sums.values()))  # (n_terms,)
    # Under fp16, inf gradients are the scaler's to handle (it skips the step and lowers the scale); in bf16
    # and fp32 they are a divergence, like a non-finite loss.
    guarded = terms if scaler.is_enabled() else torch.cat([terms, grad_norm.reshape(1)])
    stop_requested = sigint is not None and sigint.requested  # read as late as possible: Ctrl-C during this step
    terms, bad, interrupted = sync_step(terms, guarded, stop_requested, run.world_size)
    names, values = [*sums, "grad_norm"], torch.cat([terms, grad_norm.reshape(1).float()])  # (n_terms + 1,)
    if bad:  # stop before the update: the weights and the last checkpoint stay good
        watched = dict(zip(names, values.tolist()))
        if scaler.is_enabled():
            del watched["grad_norm"]
        raise Diverged(f"step {run.step + 1}: {first_non_finite(watched)}; stopped before the update, "
                       f"{Path(args.out_dir) / 'ckpt.pt'} is untouched (a new run with a lower --learning-rate "
                       f"usually avoids this)")
    scaler.step(optimizer)  # = optimizer.step(), except under fp16 (where the scaler reads its inf flag)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return Step(run.step, lr, names, values, interrupted)


# ----------------------------------------------------------------------------------------------------
# The log

class MetricsLog:
    """OUT_DIR/metrics.jsonl: a line per step and per evaluation, written by rank 0 only.

    A step's values stay on the device until a progress line or an evaluation needs them (flush): then all the
    steps logged since are fetched in one transfer, not one wait for the device per number."""

    def __init__(self, path: Path, write: bool):
        self.path, self.write = path, write
        self.pending: list[tuple[dict, Step]] = []  # steps not yet written
        self.step_ms: list[float] = []              # durations of the steps since the last evaluation
        self.evaluations: list[dict] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.flush()

    def add_step(self, step: Step, ms: float) -> None:
        self.step_ms.append(ms)
        self.pending.append(({"step": step.number, "lr": step.lr, "ms": ms}, step))

    def flush(self) -> dict | None:
        """Write the pending steps; returns the last one."""
        flat = torch.cat([step.values for _, step in self.pending]).tolist() if self.pending else []
        record = None
        for record, step in self.pending:
            record.update(zip(step.names, flat[:len(step.names)]))
            del flat[:len(step.names)]
            if not math.isfinite(record["grad_norm"]):  # only with fp16: the scaler skipped this step
                record.update(grad_norm=None, skipped=True)
            self.append(record)
        self.pending.clear()
        return record

    def add_evaluation(self, record: dict) -> dict:
        """An evaluation's record, with the mean duration of the steps since the one before."""
        record["ms_per_iter"] = float(np.mean(self.step_ms)) if self.step_ms else None
        self.step_ms.clear()
        self.evaluations.append(record)
        self.append(record)
        return record

    def append(self, record: dict) -> None:
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def print_progress(run: Run, record: dict, recent_ms: list[float]) -> None:
    """step 40/1000 | loss 3.1 | lm 2.9 | nitp 0.2 | lr 8.00e-04 | 52 ms/iter | 19.7k tok/s | left 0m50s"""
    args = run.args
    ms = float(np.mean(recent_ms))
    tokens_per_step = args.batch_size * args.grad_accum * args.block_size * run.world_size
    left = ms / 1000 * (args.max_iters - record["step"])
    losses = {k: v for k, v in record.items() if k not in ("step", "lr", "ms", "grad_norm", "skipped")}
    shown = " | ".join(f"{k} {v:.4f}" for k, v in losses.items())
    print(f"step {record['step']:5d}/{args.max_iters} | {shown} | lr {record['lr']:.2e} | {ms:.0f} ms/iter | "
          f"{tokens_per_step / ms:.1f}k tok/s | left {int(left // 60)}m{int(left % 60):02d}s")


def describe(run: Run) -> str:
    head_params = sum(p.numel() for p in run.nitp.parameters()) if run.nitp else 0
    return (f"model: {model_size(run.model)} parameters"
            + (f" + NITP head {head_params / 1e6:.2f}M (training only), target block {run.nitp.layer}" if run.nitp else "")
            + f" | {len(run.dataset.train):,} train / {len(run.dataset.val):,} val tokens | {run.device}, "
            + str(run.dtype).removeprefix("torch.") + (f" x {run.world_size} processes" if run.world_size > 1 else ""))


# ----------------------------------------------------------------------------------------------------
# The loop

def train(run: Run, on_eval=None, sample: bool = True) -> list[dict]:
    """Train to args.max_iters; returns the evaluation records. on_eval(record) is called after each one.
    Raises Diverged (nothing saved after the last good checkpoint) or Interrupted (a checkpoint saved)."""
    args, master = run.args, run.rank == 0  # under DDP only rank 0 prints, evaluates, samples and writes files
    out_dir = Path(args.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.start_metrics(out_dir / "metrics.jsonl", run.step)
    log = MetricsLog(out_dir / "metrics.jsonl", write=master)
    autocast = devices.autocast_for(run.device, run.dtype)
    model = compiled(run.model) if args.compile else run.model  # what the steps and evaluations call
    loss_fn = loss_module(run, model)
    val_batches = validation_batches(run.dataset.val, args.batch_size, args.block_size, args.eval_iters, run.device)

    def evaluation() -> None:  # rank 0 only
        t0 = time.perf_counter()
        record = {"step": run.step, "eval": True, **evaluate(model, run.nitp, val_batches, autocast)}
        if run.nitp is not None:  # on the eager model: gradients in eval mode would make --compile recompile
            record.update(nitp_diagnostics(run.model, run.nitp, *val_batches[0], autocast))
        record = log.add_evaluation({**record, "eval_s": time.perf_counter() - t0})  # + ms/iter since the last
        print_evaluation(record)
        if on_eval is not None:
            on_eval(record)

    if master:
        print(describe(run))
        if run.step == 0:
            evaluation()
    with StopOnSigint() as sigint, log:  # the log writes what it still holds however the loop ends
        while run.step < args.max_iters:
            t0 = time.perf_counter()
            step = train_step(run, loss_fn, autocast, sigint)
            log.add_step(step, ms=1000 * (time.perf_counter() - t0))  # train_step waited for the device
            last = step.number == args.max_iters
            if step.number % args.log_interval == 0 or last:
                record = log.flush()
                if master:
                    print_progress(run, record, log.step_ms[-args.log_interval:])
            if step.number % args.eval_interval == 0 or last:
                log.flush()
                if master:
                    evaluation()
                    checkpoint.save(out_dir / "ckpt.pt", run)
            if step.interrupted:
                log.flush()
                if master:
                    checkpoint.save(out_dir / "ckpt.pt", run)
                raise Interrupted(f"interrupted: saved step {step.number} to {out_dir / 'ckpt.pt'}; continue with: "
                                  f"{checkpoint.launcher(run.world_size)} train.py --resume --out-dir {args.out_dir}")
    if master and sample:
        prompt = torch.tensor([run.dataset.tokenizer.encode_ordinary("\n")], device=run.device)
        text = run.model.generate(prompt, max_new_tokens=300, temperature=0.8, top_k=50)[0].tolist()
        print("sample:\n" + run.dataset.tokenizer.decode(text, errors="replace"))
    return log.evaluations


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        check_out_dir(args.out_dir)
        ckpt = None
        if args.resume:  # the run's settings come from its checkpoint, except what flags may change
            ckpt = checkpoint.load(args.out_dir)
            args = parse_args(argv, saved=ckpt["args"])
        run = setup(args, ckpt)
    except ValueError as e:  # config, data, device, output folder and checkpoint problems: the user's to fix
        fail(str(e))
    if run.world_size > 1:
        dist.init_process_group("nccl" if run.device.type == "cuda" else "gloo")
    try:
        train(run)
    except Diverged as e:
        fail(str(e), status=3)
    except Interrupted as e:
        say(str(e), sys.stdout)
        sys.exit(130)  # the shell's code for Ctrl-C: a caller (a script, compare.py's next run) must not go on
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
