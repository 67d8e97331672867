"""Train a small GPT with next-token prediction (NTP), or with NTP + NITP.

    python train.py            # the NTP baseline
    python train.py --nitp     # the same run with the NITP loss added
    python compare.py          # both, side by side, over three seeds
    torchrun --standalone --nproc_per_node=8 train.py --nitp   # data-parallel (DDP) over 8 GPUs

Every run writes OUT_DIR/metrics.jsonl (one line per step, one per evaluation) and OUT_DIR/ckpt.pt.
Exit status: 0 done; 2 bad input; 3 a loss term or the gradient norm became NaN or infinite (the checkpoint
keeps the last good state); 130 interrupted with Ctrl-C, after saving a checkpoint to resume from.

Read it top to bottom: `main`, what a run holds and how it is set up, the loop, one step, the evaluation. What a
run on one CPU does not need to be understood (the command line's flags, devices and precision, torchrun,
checkpoints, the log) is in machinery.py, called by name: skip it on a first reading. `python train.py --help`
lists every flag with its default.
"""
import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import machinery
from data import Dataset, get_batch, get_tokenizer, load_dataset
from model import GPT, GPTConfig
from nitp import NITP, Geometry, NITPConfig, TrainingLoss, diagnostics, target_layer


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


@dataclass
class Settings:
    """What a run's flags ask for, checked: where it runs, on which tokens, with which model and head."""
    device: torch.device
    dtype: torch.dtype
    rank: int
    world_size: int
    dataset: Dataset
    model: GPTConfig
    nitp: NITPConfig | None


def setup(args: argparse.Namespace, ckpt: dict | None = None) -> Run:
    """A new run, or with `ckpt` the run it saved. Raises ValueError on bad input, before anything is written."""
    run = build(args, prepare(args, ckpt))
    if ckpt is not None:
        machinery.restore(run, ckpt)
    return run


def prepare(args: argparse.Namespace, ckpt: dict | None = None) -> Settings:
    """Check every setting that can be wrong (the device, the dtype, the model, the data) and load the data: the
    token cache is the first file a run writes. Raises ValueError."""
    if args.deterministic:
        machinery.use_deterministic_algorithms()  # before the first kernel
    device = machinery.pick_device(args.device)
    dtype = machinery.pick_dtype(args.dtype, device)
    if args.compile:
        machinery.check_compile(device)
    rank, world_size = machinery.torchrun_rank(device)
    if ckpt is not None:
        machinery.check_world_size(ckpt, world_size, args.out_dir)
    tokenizer = get_tokenizer(args.tokenizer)
    model, nitp = model_config(args, tokenizer.n_vocab), nitp_config(args)
    dataset = load_dataset(args.data, tokenizer, args.block_size)
    return Settings(device, dtype, rank, world_size, dataset, model, nitp)


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


def build(args: argparse.Namespace, settings: Settings) -> Run:
    """The model (seeded), the NITP head, AdamW over both, the precision, the batch generator."""
    torch.manual_seed(args.seed)
    model = GPT(settings.model).to(settings.device)
    # Built after the backbone, from the same seed: NTP and NITP runs of one seed start from the same weights.
    nitp = NITP(settings.nitp, args.n_layer, args.n_embd).to(settings.device) if settings.nitp else None
    params = {id(p): p for m in [model] + ([nitp] if nitp else []) for p in m.parameters()}.values()  # tied: once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},  # matrices only
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95),
                                  **machinery.optimizer_kernels(settings.device))
    return Run(args, settings.device, machinery.Precision(settings.device, settings.dtype), settings.dataset,
               model, nitp, optimizer, torch.Generator().manual_seed(args.seed), rank=settings.rank,
               world_size=settings.world_size)


def training_loss(run: Run) -> torch.nn.Module:
    """What a step calls: L = L_NTP + λ·L_NITP from one pass of the backbone (nitp.TrainingLoss), on the compiled
    model with --compile, with the gradients averaged across processes under torchrun."""
    model = machinery.compiled(run.model) if run.args.compile else run.model
    return machinery.data_parallel(TrainingLoss(model, run.nitp), run)


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
    out_dir = Path(args.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        machinery.start_metrics(out_dir / "metrics.jsonl", run.step)
    log = machinery.MetricsLog(out_dir / "metrics.jsonl", write=master)
    loss_fn = training_loss(run)
    val_batches = validation_batches(run.dataset.val, args.batch_size, args.block_size, args.eval_iters, run.device)

    def evaluation() -> None:  # rank 0 only
        t0 = time.perf_counter()
        record = {"step": run.step, "eval": True, **evaluate(run, loss_fn.module if run.world_size > 1 else loss_fn,
                                                             val_batches)}
        record = log.add_evaluation({**record, "eval_s": time.perf_counter() - t0})  # + ms/iter since the last
        machinery.print_evaluation(record)
        if on_eval is not None:
            on_eval(record)

    if master:
        print(machinery.describe(run))
        if run.step == 0:
            evaluation()
    with machinery.StopOnSigint() as sigint, log:  # the log writes what it still holds however the loop ends
        while run.step < args.max_iters:
            t0 = time.perf_counter()
            step = train_step(run, loss_fn, sigint)
            log.add_step(step, ms=1000 * (time.perf_counter() - t0))  # train_step waited for the device
            last = step.number == args.max_iters
            if step.number % args.log_interval == 0 or last:
                record = log.flush()
                if master:
                    machinery.print_progress(run, record, log.step_ms[-args.log_interval:])
            if step.number % args.eval_interval == 0 or last:
                log.flush()
                if master:
                    evaluation()
                    machinery.save(out_dir / "ckpt.pt", run)
            if step.interrupted:
                log.flush()
                if master:
                    machinery.save(out_dir / "ckpt.pt", run)
                raise Interrupted(f"interrupted: saved step {step.number} to {out_dir / 'ckpt.pt'}; continue with: "
                                  f"{machinery.launcher(run.world_size)} train.py --resume --out-dir {args.out_dir}")
    if master and sample:
        prompt = torch.tensor([run.dataset.tokenizer.encode_ordinary("\n")], device=run.device)
        text = run.model.generate(prompt, max_new_tokens=300, temperature=0.8, top_k=50)[0].tolist()
        print("sample:\n" + run.dataset.tokenizer.decode(text, errors="replace"))
    return log.evaluations


# ----------------------------------------------------------------------------------------------------
# One training step (bench.py times this same function)

@dataclass
class Step:
    """What one optimizer step leaves for the log. `values` stay on the device until the log needs them."""
    number: int           # steps done, counting this one: 1 for the first
    lr: float
    names: list[str]      # "loss" (the total), its parts ("lm", "nitp", "moe_aux"), "grad_norm"
    values: torch.Tensor  # (len(names),) averaged over the micro-batches and the processes
    interrupted: bool     # Ctrl-C in some process: every process stops after this step


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to the peak, then cosine decay to a tenth of it at max_iters."""
    if step < args.warmup_iters:
        return args.learning_rate * (step + 1) / args.warmup_iters
    progress = (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    min_lr = args.learning_rate / 10
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (args.learning_rate - min_lr)


def train_step(run: Run, loss_fn: torch.nn.Module, sigint=None) -> Step:
    """One optimizer step: the learning rate, --grad-accum micro-batches, the gradient clip, the NaN guard and
    the update. It waits for the device once, in sync_step. Raises Diverged, before the update, if a loss term
    or the gradient norm is not finite; the weights then stay those of the last good step."""
    args, optimizer, precision = run.args, run.optimizer, run.precision
    lr = lr_at(run.step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = {}  # name -> this process's mean over the micro-batches, on the device
    for micro in range(args.grad_accum):
        batch = get_batch(run.dataset.train, run.world_size * args.batch_size, args.block_size, run.batch_rng)
        x, y = (machinery.to_device(t, run.device) for t in machinery.shard(batch, run.rank, run.world_size))
        with machinery.gradients_kept_local(loss_fn, keep=micro < args.grad_accum - 1):
            with precision.autocast:
                loss, parts = loss_fn(x, y, run.step)  # L = L_NTP + λ·L_NITP, and its parts: nitp.TrainingLoss
            precision.backward(loss / args.grad_accum)
        for name, value in [("loss", loss), *parts.items()]:
            sums[name] = sums.get(name, 0.0) + value.detach().float() / args.grad_accum
    precision.unscale(optimizer)
    grad_norm = machinery.clip_gradients(run.params, args.grad_clip)
    terms = torch.stack(list(sums.values()))  # (n_terms,)
    guarded = terms if precision.scaling else torch.cat([terms, grad_norm.reshape(1)])  # what must be finite
    stop_requested = sigint is not None and sigint.requested  # read as late as possible: Ctrl-C during this step
    terms, bad, interrupted = machinery.sync_step(terms, guarded, stop_requested, run.world_size)
    names, values = [*sums, "grad_norm"], torch.cat([terms, grad_norm.reshape(1).float()])  # (n_terms + 1,)
    if bad:  # stop before the update: the weights and the last checkpoint stay good
        watched = {k: v for k, v in zip(names, values.tolist()) if k != "grad_norm" or not precision.scaling}
        raise Diverged(f"step {run.step + 1}: {machinery.first_non_finite(watched)}; stopped before the update, "
                       f"{Path(args.out_dir) / 'ckpt.pt'} is untouched (a new run with a lower --learning-rate "
                       f"usually avoids this)")
    precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return Step(run.step, lr, names, values, interrupted)


# ----------------------------------------------------------------------------------------------------
# The evaluation: the validation loss, and the geometry that NITP claims to change

def validation_batches(tokens: np.ndarray, batch_size: int, block_size: int, n_batches: int,
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same validation batches at every evaluation and in every run (their generator has its own seed), so
    that the NTP and NITP runs of compare.py are measured on exactly the same tokens."""
    rng = torch.Generator().manual_seed(0)
    return [tuple(machinery.to_device(t, device) for t in get_batch(tokens, batch_size, block_size, rng))
            for _ in range(n_batches)]


@torch.no_grad()
def evaluate(run: Run, loss_fn: TrainingLoss, val_batches) -> dict:
    """The pure LM validation loss, the NITP loss, and the geometry of the hidden states, on every validation
    batch: `erank` and `anisotropy` of the final hidden states (the LM head's input, the vector NITP trains),
    `erank_by_layer` of every block's output ([0] the embeddings), and how many states they used."""
    model = loss_fn.model  # compiled with --compile
    model.eval()
    lm_losses, nitp_losses, expert_shares = [], [], []
    final, by_layer = Geometry(), [Geometry() for _ in range(run.model.config.n_layer + 1)]
    for x, y in val_batches:
        with run.precision.autocast:
            out = model(x, y)
            lm_losses.append(out.loss)
            if run.nitp is not None:
                nitp_losses.append(run.nitp(out.hidden, out.block_outputs[run.nitp.layer]))
        if out.expert_share is not None:
            expert_shares.append(out.expert_share)  # (n_moe_layers, E)
        final.add(out.hidden)                       # (B, T, d): B windows of T states
        for geometry, z in zip(by_layer, out.block_outputs):
            geometry.add(z)
    model.train()
    record = {"val_lm": torch.stack(lm_losses).mean().item(),
              "val_nitp": torch.stack(nitp_losses).mean().item() if run.nitp is not None else None,
              "erank": final.effective_rank(), "anisotropy": final.anisotropy(),
              "erank_by_layer": [geometry.effective_rank() for geometry in by_layer],
              "geometry_states": final.n, "geometry_windows": final.windows}
    if expert_shares:  # each expert's share of the routed slots, per MoE layer; ideal is 1/E each
        share = torch.stack(expert_shares).mean(dim=0)  # (n_moe_layers, E)
        record.update(expert_share=share.tolist(), max_load=(share.max() * share.size(1)).item())  # 1 = balanced
    if run.nitp is not None:  # on the eager model: gradients in eval mode would make --compile recompile
        record.update(diagnostics(run.model, run.nitp, *val_batches[0], run.precision.autocast))
    return record


if __name__ == "__main__":
    main()
