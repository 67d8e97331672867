"""What a training run needs and a first reading skips: none of it is about NTP or NITP.

train.py calls it by name, and a run on one CPU in float32 uses almost none of it:
  - the command line's checks: train.py's flags, built from its settings; one line per user error, printed once
    under torchrun; an output folder we can write to;
  - devices and precision: the device (checked with a kernel), the training dtype (--dtype) with autocast and
    float16's gradient scaler, fused AdamW, --compile, --deterministic, batches sent to a GPU without waiting;
  - torchrun's set-up: this process's rank and the number of processes;
  - checkpoints and --resume: what a run saves, files written so that a crash never leaves half of one, a
    stopped run continued exactly where it stopped, and Ctrl-C that stops a run after a step.

Learners train on a laptop CPU, a MacBook (MPS), a free Colab T4 or an older lab GPU, with whatever torch they
have: the differences between those live here.
"""
import argparse
import ast
import contextlib
import json
import math
import os
import re
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tiktoken
import torch

from data import TOKENIZERS, atomic_write
from model import GPT, MoE
from nitp import HEADS, LOSSES, NITP

# ----------------------------------------------------------------------------------------------------
# Messages and the command line's checks

def say(message: str, stream=None) -> None:
    """Print a message (to stderr unless told otherwise) once: under torchrun, from rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=stream or sys.stderr)


def printable_output() -> None:
    """Print whatever the console's encoding can hold, and a stand-in for the rest, instead of crashing. Python on
    Windows writes a redirected stdout in the locale's code page (cp1252) and stops at the first character it
    lacks ("−", "λ", a sample's "\ufffd"). Every entry point calls this first, before its parser can print."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a TextIOWrapper; None under pythonw, something else when replaced
            stream.reconfigure(errors="backslashreplace")


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
# train.py's command line, built from the settings at the top of train.py. compare.py, ablations.py and bench.py
# take the same flags (their parsers add their own).

SETTINGS = Path(__file__).with_name("train.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = {"nitp_shift": (1, 0), "nitp_head": HEADS, "nitp_loss": LOSSES, "tokenizer": TOKENIZERS,
           "dtype": ("auto", *DTYPES)}


def make_parser() -> argparse.ArgumentParser:
    """A flag for each line `name = default  # help` of train.py's settings (name_with_underscores is
    --name-with-dashes), in the groups of its `# heading` lines; a comment line indented under a setting goes on
    with its help. The type is the default's: a bool is a switch (off by default), a float refuses inf and NaN,
    and None (a value computed from the others, in parse_args) stands for an integer. Read, not imported:
    train.py imports this file."""
    parser = OneLineParser(description="Train a small GPT with NTP, or NTP + NITP.", allow_abbrev=False,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    block = SETTINGS.read_text().split("\n# Settings:", 1)[1].split("\n\n", 1)[1]  # after the intro paragraph
    group, settings = parser, []  # settings: [group, name, default, help]
    for line in block.split("\n# ---", 1)[0].splitlines():
        if heading := re.fullmatch(r"# (.+)", line):
            group = parser.add_argument_group(heading[1])
        elif setting := re.fullmatch(r"(\w+) = (.+?) +# (.+)", line):
            settings.append([group, setting[1], ast.literal_eval(setting[2]), setting[3]])
        elif more := re.fullmatch(r" +# (.+)", line):
            settings[-1][3] += " " + more[1]
        elif line.strip():
            raise SyntaxError(f"{SETTINGS}: {line!r} is not `name = default  # help`, a `# heading` or a blank line")
    for group, name, default, help in settings:
        flag, help = "--" + name.replace("_", "-"), help.replace("%", "%%")  # argparse formats its help with %
        if isinstance(default, bool):
            group.add_argument(flag, action="store_true", help=help)
        else:
            kind = {float: finite_float, str: str}.get(type(default), int)  # int, or None: an integer
            group.add_argument(flag, type=kind, default=default, choices=CHOICES.get(name), help=help)
    return parser


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


# The compute capabilities that each CUDA build of a torch release has kernels for (x86-64), as torch 2.13 lists
# them (torch.cuda.PYTORCH_RELEASES_CODE_CC); a newer torch's own list is read instead where it has one.
CUDA_BUILDS = {"12.6": {50, 60, 70, 75, 80, 86, 90}, "12.9": {75, 80, 86, 90, 100, 120},
               "13.0": {75, 80, 86, 90, 100, 120}}


def builds_with_kernels_for(major: int, minor: int) -> list[str]:
    """The CUDA versions of this torch release's builds that can run a GPU of this compute capability: kernels
    for X.Y run on X.Y and on later minors of the same major (8.0's on an 8.6), never across majors."""
    releases = getattr(torch.cuda, "PYTORCH_RELEASES_CODE_CC", None)
    builds = {cuda: by_arch.get("x86_64", set()) for cuda, by_arch in releases.items()} if releases else CUDA_BUILDS
    return [cuda for cuda, ccs in builds.items() if any(cc // 10 == major and cc % 10 <= minor for cc in ccs)]


def missing_kernels(device: torch.device) -> str:
    """The one line for a GPU that this build has no kernels for, naming a build that has them: the newest cards
    (Blackwell, 10.x and 12.x) need CUDA 12.8 or newer builds, the oldest only the 12.6 ones."""
    major, minor = torch.cuda.get_device_capability(device)
    builds, version = builds_with_kernels_for(major, minor), torch.__version__.split("+")[0]
    install = (f"install a build for it, e.g. pip install torch=={version} --index-url "
               f"https://download.pytorch.org/whl/cu{builds[0].replace('.', '')} (builds for CUDA "
               f"{', '.join(builds)} have them)" if builds else
               f"no CUDA build of torch {version} has them: install an older torch release that has")
    return (f"this PyTorch build ({torch.__version__}) has no kernels for {torch.cuda.get_device_name(device)} "
            f"(compute capability {major}.{minor}; the build has {' '.join(torch.cuda.get_arch_list())}); "
            f"{install}, or use --device cpu")


def use_deterministic_algorithms() -> None:
    """For --deterministic. Without it, CUDA runs differ in the last bits from run to run: attention's backward
    and index_add_ (the MoE's scatter) add up partial results in whatever order the GPU's threads finish. cuBLAS
    reads its workspace setting once, at its first call: it must be set before any matmul."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def optimizer_kernels(device: torch.device) -> dict:
    """How AdamW runs here: one fused kernel for all parameters on CUDA and MPS (both since torch 2.4). On the
    CPU, the default loop over the parameters: the classroom numbers were measured with it, and a step of the
    toy model is dominated by the matmuls anyway. restore() re-applies this choice on resume, since
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
        if device.type == "cuda":  # float32 matmuls in TF32 on tensor cores (8.0+), as nanoGPT: ~10 bits of mantissa
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.autocast = autocast_for(device, dtype)  # `with precision.autocast:` around each forward pass
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def check_compile(device: torch.device) -> None:
    """--compile where torch.compile can run: refused with one line elsewhere, rather than a long traceback later."""
    if device.type == "mps":
        raise ValueError("--compile is not supported on MPS here (prototype in torch, untested by us); "
                         "drop --compile")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 0):
        raise ValueError("--compile needs a GPU of compute capability 7.0 or higher (Triton); drop --compile")
    missing = compile_missing(device)
    if missing:
        raise ValueError(f"--compile cannot run here: {missing}; drop --compile")


def compile_missing(device: torch.device) -> str | None:
    """What torch.compile (dynamo, then inductor) lacks on this machine for `device`, or None: dynamo support for
    this Python (torch 2.13 has none on 3.15), Triton for CUDA kernels (Windows CUDA wheels ship none), a C++
    compiler for CPU kernels (Windows has no MSVC by default). Asked the way torch itself asks."""
    import torch._dynamo  # noqa: F401  (only with --compile: it takes seconds to import)
    if not torch._dynamo.eval_frame.is_dynamo_supported():
        return f"torch {torch.__version__} has no torch.compile for Python {sys.version.split()[0]}"
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            return "Triton is not installed (pip install triton; Windows: pip install triton-windows)"
    elif device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler
        try:
            get_cpp_compiler()
        except Exception as e:  # InvalidCxxCompiler, or an MSVC that does not answer
            return f"no C++ compiler for the CPU kernels ({type(e).__name__}; Windows: the MSVC build tools)"
    return None


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
# torchrun's set-up

def torchrun_rank(device: torch.device) -> tuple[int, int]:
    """(rank, world size) from the variables torchrun sets; (0, 1) without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"torchrun runs on CUDA GPUs (nccl) or the CPU (gloo), not on {device.type}; "
                         f"add --device cpu")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


# ----------------------------------------------------------------------------------------------------
# Checkpoints and --resume. A resumed run is first built like a new one, from the checkpoint's own settings
# (parse_args takes them as defaults, and `check_flags` refuses a flag that would change what is trained);
# `restore` then puts the saved state into it: the weights, the optimizer and gradient-scaler state, the batch
# generator and the step. The steps logged after the checkpoint are dropped from metrics.jsonl (`start_metrics`),
# since the resumed run does them again.

VERSION = 1


REQUIRED = {"step", "model", "nitp", "optimizer", "args", "rng"}  # what restore() reads


# Flags that a resumed run may change: how long, where or how fast it trains, not what it trains.
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "log_interval", "device", "dtype", "compile", "deterministic"}


# Flags that say what to do now, not how the run was trained: never taken from a checkpoint.
NOT_SAVED = {"resume", "out_dir"}


def launcher(world_size: int) -> str:
    """The command that starts a run with this many processes."""
    return f"torchrun --standalone --nproc_per_node={world_size}" if world_size > 1 else "python"


def save(path: Path, *, step: int, world_size: int, args: argparse.Namespace, model: GPT, head: NITP | None,
         optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, batch_rng: torch.Generator) -> None:
    """Everything `restore` needs to continue a run bit for bit, plus what a reader wants to know later: the
    model's config, the command and the package versions. Written whole or not at all (data.atomic_write)."""
    state = {
        "format_version": VERSION, "step": step, "world_size": world_size,
        "model": model.state_dict(), "nitp": head.state_dict() if head else None,
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "rng": {"batches": batch_rng.get_state(), "torch": torch.get_rng_state()},
        "model_config": asdict(model.config), "args": vars(args), "command": sys.argv,
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


def check_flags(saved: dict, args: argparse.Namespace) -> None:
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


def restore(ckpt: dict, *, model: GPT, head: NITP | None, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, batch_rng: torch.Generator, out_dir: str) -> int:
    """Put the checkpoint's state into a freshly built run's parts; returns the step to continue from. Raises
    ValueError if it does not fit."""
    try:
        model.load_state_dict(ckpt["model"])
        if head is not None:
            head.load_state_dict(ckpt["nitp"])
        optimizer.load_state_dict(with_kernels_of(optimizer, ckpt["optimizer"]))
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        batch_rng.set_state(ckpt["rng"]["batches"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"the checkpoint in {out_dir} does not fit this model "
                         f"({str(e).splitlines()[0][:120]}); start a new run in another --out-dir") from None
    return ckpt["step"]


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


class StopOnSigint:
    """Ctrl-C asks the loop to stop after the current step, so that the checkpoint it saves is consistent."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)
