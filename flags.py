"""The command line of train.py: every flag with its default, and the checks that need no device and no data.

bench.py takes the same flags (and refuses those it cannot use); compare.py and ablations.py take them too, for
every run they train, and add their own.
The defaults are the classroom setting, chosen and checked on fresh seeds in RESULTS.md ("The classroom
setting").
"""
import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import checkpoint
from data import TOKENIZERS
from devices import DTYPES
from nitp import HEADS, LOSSES


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
    g.add_argument("--nitp-head-width", type=int, default=None,
                   help="the SwiGLU head's hidden width (default 4 * n_embd, the paper's; smaller costs less)")
    g.add_argument("--nitp-loss", choices=LOSSES, default="cosine", help="ablation: the distance between P(h) and z")
    g.add_argument("--nitp-start", type=int, default=0, help="ablation: the step at which the NITP loss switches on")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="python-docs",
                   help="'python-docs' (embedded), 'shakespeare' (downloaded once) or a path to a UTF-8 text file")
    g.add_argument("--tokenizer", choices=TOKENIZERS, default="bytes",
                   help="'bytes' (256 tokens, offline) or a standard tiktoken encoding")
    # The defaults are the classroom setting (RESULTS.md, "The classroom setting"): chosen on seeds 1-3 as the
    # fastest setting in which NITP's effect on the geometry exceeds the seed spread, then checked on fresh seeds.
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
    g = p.add_argument_group("system")
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
    """The command line (of make_parser(), or of `parser`, bench.py's, which adds flags to it). With `saved` (a
    checkpoint's settings), those are the defaults, and a flag given now may change only the resumable ones
    (checkpoint.RESUMABLE); a ValueError says which flag did."""
    parser = parser or make_parser()
    if saved is not None:  # a flag of the checkpoint's that this parser lacks (an older version's) is left out
        known = vars(parser.parse_args([]))
        parser.set_defaults(**{k: v for k, v in saved.items() if k in known and k not in checkpoint.NOT_SAVED})
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
        checkpoint.check_flags(saved, args)
    return args


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
