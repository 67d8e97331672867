"""Checkpoints and --resume: what a run saves, how a file is written so that a crash never leaves half of it,
and how a stopped run continues exactly where it stopped.

A resumed run is first built like a new one, from the checkpoint's own settings (train.parse_args reads them
through `check_flags`); `restore` then puts the saved state into it: the weights, the optimizer and
gradient-scaler state, the batch generator and the step. The steps logged after the checkpoint are dropped
from metrics.jsonl (`start_metrics`), since the resumed run does them again.
"""
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tiktoken
import torch

VERSION = 1
REQUIRED = {"step", "model", "nitp", "optimizer", "args", "rng"}  # what restore() reads
# Flags that a resumed run may change: how long, where or how fast it trains, not what it trains.
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "log_interval", "device", "dtype", "compile", "deterministic"}
# Flags that say what to do now, not how the run was trained: never taken from a checkpoint.
NOT_SAVED = {"resume", "out_dir"}


def atomic_write(path: Path, write) -> None:
    """write(file) into a temporary file, flush it to disk, then rename it to path: a crash at any moment leaves
    the old file or the new one, never half of one. The temporary name holds the process id, so that processes
    writing the same file at once (DDP ranks filling the token cache) never write into each other's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def launcher(world_size: int) -> str:
    """The command that starts a run with this many processes."""
    return f"torchrun --standalone --nproc_per_node={world_size}" if world_size > 1 else "python"


# ----------------------------------------------------------------------------------------------------
# Out: the state of a run, saved at every evaluation and on Ctrl-C

def save(path: Path, run) -> None:
    """Everything `restore` needs to continue `run` (a train.Run) bit for bit, plus what a reader wants to
    know later: the model's config, the command and the package versions."""
    state = {
        "format_version": VERSION, "step": run.step, "world_size": run.world_size,
        "model": run.model.state_dict(), "nitp": run.nitp.state_dict() if run.nitp else None,
        "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
        "rng": {"batches": run.batch_rng.get_state(), "torch": torch.get_rng_state()},
        "model_config": asdict(run.model.config), "args": vars(run.args), "command": sys.argv,
        "versions": {"torch": str(torch.__version__), "numpy": np.__version__, "tiktoken": tiktoken.__version__,
                     "python": sys.version.split()[0]}}
    atomic_write(path, lambda f: torch.save(state, f))


# ----------------------------------------------------------------------------------------------------
# In: --resume (and probe.py, which reads a run's weights)

def load(out_dir: str) -> dict:
    """The checkpoint in out_dir, checked to be one of ours. Raises ValueError with what to do."""
    path = Path(out_dir) / "ckpt.pt"
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path} to resume; train without --resume first, or point --out-dir at a run")
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
            run.scaler.load_state_dict(ckpt["scaler"])
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
