"""The machinery of a training run that a reader can skip: none of it is about NTP or NITP.

train.py calls it by name, and a run on one CPU in float32 uses almost none of it:
  - messages and the command line: train.py's flags with their defaults, one line per user error, printed once
    under torchrun;
  - devices and precision: the device (checked with a kernel), the training dtype (--dtype) with autocast and
    float16's gradient scaler, fused AdamW, --compile, --deterministic, batches sent to a GPU without waiting;
  - data parallel under torchrun: each process's share of a batch, the gradients averaged (DDP), the one wait
    for the device per step (the NaN guard, and Ctrl-C agreed across processes);
  - the log: metrics.jsonl, written a batch of steps at a time, and the lines a run prints;
  - checkpoints and --resume: what a run saves, files written so that a crash never leaves half of one, and a
    stopped run continued exactly where it stopped.

Learners train on a laptop CPU, a MacBook (MPS), a free Colab T4 or an older lab GPU, with whatever torch they
have: the differences between those live here.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import TOKENIZERS, atomic_write
from model import MoE, model_size
from nitp import HEADS, LOSSES

# ----------------------------------------------------------------------------------------------------
# Messages and the command line's checks

def say(message: str, stream=None) -> None:
    """Print a message (to stderr unless told otherwise) once: under torchrun, from rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=stream or sys.stderr)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage; one line that says what to do is enough
        say(f"{self.prog}: error: {message} (see --help)")
        self.exit(2)


def finite_float(text: str) -> float:
    value = float(text)  # a ValueError here becomes argparse's "invalid finite_float value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def fail(message: str, status: int = 2, program: str = "train.py") -> None:
    """A user error (status 2) or a diverged run (3): one line that says what to do, and a non-zero exit."""
    say(f"{program}: error: {message}")
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


# ----------------------------------------------------------------------------------------------------
# train.py's command line: every flag with its default. The defaults are the classroom setting, chosen and checked
# on fresh seeds (RESULTS.md). compare.py, ablations.py and bench.py take the same flags.

def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Train a small GPT with NTP, or NTP + NITP.", allow_abbrev=False,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    real = finite_float  # a float flag refuses inf and nan
    g = p.add_argument_group("NITP")
    g.add_argument("--nitp", action="store_true", help="add the NITP loss (without it: the NTP baseline)")
    g.add_argument("--nitp-lambda", type=real, default=1.0, help="λ, the weight of the NITP loss")
    g.add_argument("--nitp-layer", type=int, default=None,
                   help="target block k (0 = embeddings); default round(0.2 * n_layer), at least 1")
    g.add_argument("--nitp-shift", type=int, choices=(1, 0), default=1,
                   help="ablation: 1 predicts z_{t+1} (NITP), 0 predicts z_t (same position)")
    g.add_argument("--nitp-no-stopgrad", action="store_true", help="ablation: let gradients flow into the target")
    g.add_argument("--nitp-head", choices=HEADS, default="swiglu", help="ablation: the projection head P")
    g.add_argument("--nitp-head-width", type=int, default=None,
                   help="the SwiGLU head's hidden width (default 4 * n_embd, the paper's; smaller costs less)")
    g.add_argument("--nitp-loss", choices=LOSSES, default="cosine", help="ablation: the distance between P(h) and z")
    g.add_argument("--nitp-start", type=int, default=0, help="ablation: the step at which the NITP loss switches on")
    g.add_argument("--nitp-shuffled-target", action="store_true",
                   help="control: each target z comes from a random other position (the form of NITP, no content)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="python-docs", help="'python-docs' (the Python reference, in corpus/), "
                   "'shakespeare' (downloaded once) or a path to a UTF-8 text file")
    g.add_argument("--tokenizer", choices=TOKENIZERS, default="bytes",
                   help="'bytes' (256 tokens, offline) or a standard tiktoken encoding")
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
    g.add_argument("--aux-loss-coef", type=real, default=0.01, help="weight of the load-balancing loss")
    g.add_argument("--z-loss-coef", type=real, default=0.0, help="weight of the router z-loss (0 = off)")
    g = p.add_argument_group("training")
    g.add_argument("--max-iters", type=int, default=1000, help="optimizer steps in total")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch, per process under torchrun")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning-rate", type=real, default=2e-3, help="peak learning rate")
    g.add_argument("--warmup-iters", type=int, default=None,
                   help="steps of linear warm-up before the cosine decay (default: a tenth of --max-iters)")
    g.add_argument("--weight-decay", type=real, default=0.1, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=real, default=1.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--seed", type=int, default=1337, help="seed for the weights and the batch order")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="evaluate and checkpoint every this many steps (default: a tenth of --max-iters)")
    g.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation")
    g.add_argument("--log-interval", type=int, default=20, help="print a progress line every this many steps")
    g.add_argument("--out-dir", default="out", help="where metrics.jsonl and ckpt.pt go")
    g.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out-dir "
                   "(only --max-iters, --eval-interval, --eval-iters, --log-interval and the system flags may change)")
    g = p.add_argument_group("system (DEVICES.md)")
    g.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu), or a torch device name")
    g.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="'auto': bfloat16 on CUDA GPUs that have it natively, float16 on older ones, float32 "
                        "on the CPU and MPS; bfloat16/float16 train under autocast")
    g.add_argument("--compile", action="store_true", help="compile the model with torch.compile (CUDA, CPU)")
    g.add_argument("--deterministic", action="store_true",
                   help="torch's deterministic algorithms: on CUDA, runs and resumes that repeat bit for bit, "
                        "somewhat slower (the CPU is deterministic without it)")
    return p


def parse_args(argv: list[str] | None = None, saved: dict | None = None,
               parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line (of make_parser(), or of `parser`: compare.py's or bench.py's, which add flags to it). With
    `saved` (a checkpoint's settings), those are the defaults, and a flag given now may change only the resumable
    ones (RESUMABLE); a ValueError says which flag did."""
    parser = parser or make_parser()
    if saved is not None:  # a flag of the checkpoint's that this parser lacks (an older version's) is left out
        known = vars(parser.parse_args([]))
        parser.set_defaults(**{k: v for k, v in saved.items() if k in known and k not in NOT_SAVED})
    args = parser.parse_args(argv)
    if args.warmup_iters is None:
        args.warmup_iters = args.max_iters // 10
    if args.eval_interval is None:
        args.eval_interval = max(1, args.max_iters // 10)
    for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.learning_rate <= 0 or args.warmup_iters < 0 or args.weight_decay < 0 or args.grad_clip < 0:
        parser.error("--learning-rate must be > 0; --warmup-iters, --weight-decay and --grad-clip >= 0")
    if saved is not None:
        check_flags(saved, args)
    return args


# ----------------------------------------------------------------------------------------------------
# Devices and precision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    """The device to train on, checked by running a kernel there. A GPU that this torch build has no kernels for
    (its wheel was built for newer GPUs only) is refused with the build to install instead."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun: one GPU per process on this machine
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        device = torch.device(name)
        run_a_kernel(device)
    except (RuntimeError, AssertionError) as e:  # AcceleratorError (torch 2.9+) is a RuntimeError
        if "no kernel image" in str(e):
            raise ValueError(missing_kernels(device)) from None
        reason = str(e).splitlines()[0].split(". ")[0][:160]  # torch's first sentence; the rest lists backends
        raise ValueError(f"device {name!r} is not usable here ({reason}); try --device cpu") from None
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the current GPU, for the kernels that take no device (and for nccl)
    return device


def run_a_kernel(device: torch.device) -> None:
    """Allocating memory is not enough: a GPU older than the build's kernels allocates fine and fails at the
    first kernel. .item() waits for the kernel, so that its error surfaces here."""
    (torch.ones(4, device=device) * 2).sum().item()


def missing_kernels(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return (f"this PyTorch build ({torch.__version__}) has no kernels for {torch.cuda.get_device_name(device)} "
            f"(compute capability {major}.{minor}; the build has {' '.join(torch.cuda.get_arch_list())}); "
            f"install a build for it, e.g. pip install torch --index-url https://download.pytorch.org/whl/cu126 "
            f"(kernels for 5.0 to 9.0), or use --device cpu")


def use_deterministic_algorithms() -> None:
    """For --deterministic. Without it, CUDA runs differ in the last bits from run to run: attention's backward
    and index_add_ (the MoE's scatter) add up partial results in whatever order the GPU's threads finish. cuBLAS
    reads its workspace setting once, at its first call: it must be set before any matmul."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def optimizer_kernels(device: torch.device) -> dict:
    """How AdamW runs here: one fused kernel for all parameters on CUDA and MPS (both since torch 2.4). On the
    CPU, the default loop over the parameters: the classroom numbers were measured with it, and a step of the
    toy model is dominated by the matmuls anyway. checkpoint.restore re-applies this choice on resume, since
    a checkpoint written on another device carries that device's choice."""
    return {"fused": True} if device.type in ("cuda", "mps") else {}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The precision to train in: float32, or autocast to bfloat16 / float16 (with a gradient scaler).

    'auto' picks, like the tools learners know:
      - CUDA with compute capability 8.0+ (A100, RTX 30xx and newer): bfloat16, native on their tensor cores;
      - older CUDA GPUs (T4, V100, RTX 20xx): float16. Recent torch says bf16 is "supported" there, but it is
        emulated, without tensor cores (reported at about a tenth of fp16's speed on a T4);
      - the CPU: float32. Even on ours, whose bf16 GEMM is faster, bf16 autocast made the small model's steps
        slower (RESULTS.md, "The classroom model" under "Speed");
      - MPS: float32. Autocast on MPS is new (torch 2.5+) and we could not test it, so MPS trains in fp32.
    An explicit choice that the device cannot run is refused with one line."""
    if device.type == "cuda":
        native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        if name == "auto":
            return torch.bfloat16 if native_bf16 else torch.float16
        if name == "bfloat16" and not native_bf16:
            major, minor = torch.cuda.get_device_capability(device)
            raise ValueError(f"this GPU (compute capability {major}.{minor}) has no native bfloat16; "
                             f"use --dtype float16 (what auto picks here)")
    elif device.type == "mps" and name not in ("auto", "float32"):
        raise ValueError("on MPS this code trains in float32 only (autocast there is new and untested by us); "
                         "use --dtype float32")
    return torch.float32 if name == "auto" else DTYPES[name]


def autocast_for(device: torch.device, dtype: torch.dtype):
    """The autocast context for the forward passes: none in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Precision:
    """How a run computes: autocast to the training dtype (nothing in float32), and float16's gradient scaler,
    which multiplies the loss before backward and skips any step whose gradients overflowed (switched off, and
    passing everything through, in float32 and bfloat16)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.dtype = dtype
        self.autocast = autocast_for(device, dtype)  # `with precision.autocast:` around each forward pass
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    @property
    def scaling(self) -> bool:
        """float16: inf gradients are the scaler's to handle (it skips the step); elsewhere they are a divergence."""
        return self.scaler.is_enabled()

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), with the loss scaled up first under float16."""
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """The true gradients, to clip and to guard (nothing to undo but under float16)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(); under float16 the scaler skips it if a gradient overflowed, and adapts its scale."""
        self.scaler.step(optimizer)
        self.scaler.update()


def check_compile(device: torch.device) -> None:
    """--compile where torch.compile can run: refused with one line elsewhere, rather than a long traceback later."""
    if device.type == "mps":
        raise ValueError("--compile is not supported on MPS here (prototype in torch, untested by us); "
                         "drop --compile")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 0):
        raise ValueError("--compile needs a GPU of compute capability 7.0 or higher (Triton); drop --compile")


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile(model), with each MoE layer left eager. Its dispatch splits the tokens by counts read from
    the device, which change every step: compiled, new counts kept recompiling it (TORCH_LOGS=recompiles), and
    past dynamo's limit of 8 recompiles that code would have run eager anyway, silently. Done here, not with a
    decorator on MoE.forward: torch.compiler.disable imports dynamo, about 2 s added to every start here."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.forward = torch.compiler.disable(module.forward)
    return torch.compile(model)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to GPU through one contiguous pinned copy, without waiting: the copy overlaps the work already
    queued. (A batch is a strided view of its windows; pin_memory() would keep the strides, and a strided copy
    to the GPU first makes an unpinned temporary, which waits.)"""
    if device.type != "cuda":
        return batch.to(device)
    staged = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True)  # contiguous and page-locked
    staged.copy_(batch)
    return staged.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------
# Data parallel, under torchrun

def torchrun_rank(device: torch.device) -> tuple[int, int]:
    """(rank, world size) from the variables torchrun sets; (0, 1) without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"torchrun runs on CUDA GPUs (nccl) or the CPU (gloo), not on {device.type}; "
                         f"add --device cpu")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of a global batch: its rows of x and y. Every process draws the same global batch (of
    world_size × --batch-size rows) from the same generator and keeps its own slice, so the processes together see
    exactly the batches of one process with world_size times the batch, and the generator state that a checkpoint
    saves is the same in every process: resuming is exact under torchrun too."""
    x, y = batch                              # (world_size · B, T) each
    rows = len(x) // world_size
    mine = slice(rank * rows, (rank + 1) * rows)
    return x[mine], y[mine]                   # (B, T) each


def data_parallel(module: torch.nn.Module, run) -> torch.nn.Module:
    """The loss module, wrapped in DistributedDataParallel under torchrun (it averages the gradients of every
    process's backward); as it is in one process."""
    if run.world_size == 1:
        return module
    # Before --nitp-start the head gets no gradient, and DDP must then look for unused parameters in every step
    # (a graph traversal), or it stops with an error. MoE experts need no search: an expert that got no token
    # still runs, on an empty chunk, and gets a zero gradient.
    head_idle = run.nitp is not None and run.nitp.config.start > 0
    return DDP(module, device_ids=[run.device.index] if run.device.type == "cuda" else None,
               find_unused_parameters=head_idle)


def gradients_kept_local(loss_fn: torch.nn.Module, keep: bool):
    """Under DDP, a backward that does not average the gradients yet (every micro-batch of --grad-accum but the
    last: the average is taken once per step); otherwise nothing."""
    return loss_fn.no_sync() if keep and isinstance(loss_fn, DDP) else contextlib.nullcontext()


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


# ----------------------------------------------------------------------------------------------------
# The log

class MetricsLog:
    """OUT_DIR/metrics.jsonl: a line per step and per evaluation, written by rank 0 only.

    A step's values stay on the device until a progress line or an evaluation needs them (flush): then all the
    steps logged since are fetched in one transfer, not one wait for the device per number."""

    def __init__(self, path: Path, write: bool):
        self.path, self.write = path, write
        self.pending: list[tuple[dict, object]] = []  # steps (train.Step) not yet written
        self.step_ms: list[float] = []              # durations of the steps since the last evaluation
        self.evaluations: list[dict] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.flush()

    def add_step(self, step, ms: float) -> None:
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


def print_evaluation(record: dict) -> None:
    val_nitp = f"{record['val_nitp']:.4f}" if record["val_nitp"] is not None else "-"
    print(f"eval step {record['step']:5d} | val lm {record['val_lm']:.4f} | val nitp {val_nitp} | "
          f"erank {record['erank']:.1f} | anisotropy {record['anisotropy']:.3f}")
    for layer, share in enumerate(record.get("expert_share", [])):
        print(f"  MoE layer {layer + 1}: expert shares " + " ".join(f"{100 * s:.0f}%" for s in share))
    if "max_load" in record:
        print(f"  routing balance: busiest expert gets {record['max_load']:.2f}x its fair share (1.00 = even)")
    if "nitp_cos" in record:
        print(f"  NITP: cos(P(h), z) {record['nitp_cos']:.3f} (the mean direction: "
              f"{record.get('nitp_cos_mean_direction', float('nan')):.3f}) | |P(h)| {record['pred_norm']:.2f} | "
              f"|z| {record['target_norm']:.2f} | share of the backbone gradient {record['grad_nitp_share']:.1%} "
              f"(cos to the LM's {record['grad_cos']:+.2f})")


def print_progress(run, record: dict, recent_ms: list[float]) -> None:
    """step 40/1000 | loss 3.1 | lm 2.9 | nitp 0.2 | lr 8.00e-04 | 52 ms/iter | 19.7k tok/s | left 0m50s"""
    args = run.args
    ms = float(np.mean(recent_ms))
    tokens_per_step = args.batch_size * args.grad_accum * args.block_size * run.world_size
    left = ms / 1000 * (args.max_iters - record["step"])
    losses = {k: v for k, v in record.items() if k not in ("step", "lr", "ms", "grad_norm", "skipped")}
    shown = " | ".join(f"{k} {v:.4f}" for k, v in losses.items())
    print(f"step {record['step']:5d}/{args.max_iters} | {shown} | lr {record['lr']:.2e} | {ms:.0f} ms/iter | "
          f"{tokens_per_step / ms:.1f}k tok/s | left {int(left // 60)}m{int(left % 60):02d}s")


def describe(run) -> str:
    head = sum(p.numel() for p in run.nitp.parameters()) if run.nitp else 0
    return (f"model: {model_size(run.model)} parameters"
            + (f" + NITP head {head / 1e6:.2f}M (training only), target block {run.nitp.layer}" if run.nitp else "")
            + f" | {len(run.dataset.train):,} train / {len(run.dataset.val):,} val tokens | {run.device}, "
            + str(run.precision.dtype).removeprefix("torch.")
            + (f" x {run.world_size} processes" if run.world_size > 1 else ""))


# ----------------------------------------------------------------------------------------------------
# Checkpoints and --resume. A resumed run is first built like a new one, from the checkpoint's own settings
# (train.parse_args reads them through `check_flags`); `restore` then puts the saved state into it: the weights,
# the optimizer and gradient-scaler state, the batch generator and the step. The steps logged after the
# checkpoint are dropped from metrics.jsonl (`start_metrics`), since the resumed run does them again.

VERSION = 1


REQUIRED = {"step", "model", "nitp", "optimizer", "args", "rng"}  # what restore() reads


# Flags that a resumed run may change: how long, where or how fast it trains, not what it trains.
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "log_interval", "device", "dtype", "compile", "deterministic"}


# Flags that say what to do now, not how the run was trained: never taken from a checkpoint.
NOT_SAVED = {"resume", "out_dir"}


def launcher(world_size: int) -> str:
    """The command that starts a run with this many processes."""
    return f"torchrun --standalone --nproc_per_node={world_size}" if world_size > 1 else "python"


def save(path: Path, run) -> None:
    """Everything `restore` needs to continue `run` (a train.Run) bit for bit, plus what a reader wants to
    know later: the model's config, the command and the package versions."""
    state = {
        "format_version": VERSION, "step": run.step, "world_size": run.world_size,
        "model": run.model.state_dict(), "nitp": run.nitp.state_dict() if run.nitp else None,
        "optimizer": run.optimizer.state_dict(), "scaler": run.precision.scaler.state_dict(),
        "rng": {"batches": run.batch_rng.get_state(), "torch": torch.get_rng_state()},
        "model_config": asdict(run.model.config), "args": vars(run.args), "command": sys.argv,
        "versions": {"torch": str(torch.__version__), "numpy": np.__version__, "tiktoken": tiktoken.__version__,
                     "python": sys.version.split()[0]}}
    atomic_write(path, lambda f: torch.save(state, f))


def load(out_dir: str) -> dict:
    """The checkpoint in out_dir, checked to be one of ours. Raises ValueError with what to do."""
    path = Path(out_dir) / "ckpt.pt"
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}; point --out-dir at a run that saved one, or train one there first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read checkpoint {path} ({type(e).__name__}): it is damaged or not from "
                         f"train.py; delete it or pick another --out-dir") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != VERSION or not REQUIRED <= ckpt.keys():
        raise ValueError(f"{path} is not a version-{VERSION} train.py checkpoint; start a new run in another --out-dir")
    return ckpt


def check_flags(saved: dict, args) -> None:
    """A flag given with --resume may change only the RESUMABLE settings. Raises ValueError. (Names that this
    train.py does not know, from a checkpoint of an older version, are skipped.)"""
    for name, value in saved.items():
        if name not in RESUMABLE | NOT_SAVED and hasattr(args, name) and getattr(args, name) != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"the checkpoint in {args.out_dir} was trained with {flag} {value}, not "
                             f"{getattr(args, name)}; drop {flag} to resume, or use a new --out-dir")


def check_world_size(ckpt: dict, world_size: int, out_dir: str) -> None:
    """The batches are sliced by rank: an exact continuation needs the number of processes that wrote it."""
    saved = ckpt.get("world_size", 1)
    if saved != world_size:
        raise ValueError(f"the checkpoint in {out_dir} was written by {saved} process{'es' * (saved > 1)}, this run "
                         f"has {world_size}; an exact continuation needs the same number: resume with "
                         + (launcher(saved) if saved > 1 else "python, not torchrun"))


def restore(run, ckpt: dict) -> None:
    """Put the checkpoint's state into a freshly built run. Raises ValueError if it does not fit."""
    try:
        run.model.load_state_dict(ckpt["model"])
        if run.nitp is not None:
            run.nitp.load_state_dict(ckpt["nitp"])
        run.optimizer.load_state_dict(with_kernels_of(run.optimizer, ckpt["optimizer"]))
        if ckpt.get("scaler"):
            run.precision.scaler.load_state_dict(ckpt["scaler"])
        run.batch_rng.set_state(ckpt["rng"]["batches"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"the checkpoint in {run.args.out_dir} does not fit this model "
                         f"({str(e).splitlines()[0][:120]}); start a new run in another --out-dir") from None
    run.step = ckpt["step"]


def with_kernels_of(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """The saved optimizer state with this optimizer's kernel choice (fused, foreach) in its groups.

    load_state_dict restores the saved groups whole, their kernel choice included: a checkpoint from the CPU
    (a loop) would make a fused CUDA AdamW unfused, and under fp16 the gradient scaler, which saw a fused
    optimizer when it was built, then crashes the first step. Put before loading, the choice also moves each
    parameter's step count to where a fused kernel needs it."""
    groups = [{**saved_group, **{k: group[k] for k in ("fused", "foreach") if k in group}}
              for saved_group, group in zip(saved["param_groups"], optimizer.param_groups)]
    return {**saved, "param_groups": groups}


def start_metrics(path: Path, step: int) -> None:
    """A new run (step 0) starts an empty metrics.jsonl; a resumed one forgets what was logged after its
    checkpoint's step, since it is about to do those steps again."""
    lines = path.read_text().splitlines() if step > 0 and path.exists() else []
    kept = "".join(line + "\n" for line in lines if json.loads(line)["step"] <= step)
    atomic_write(path, lambda f: f.write(kept.encode()))


