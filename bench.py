"""Speed report: what NITP and MoE cost per training step, against the machine's matmul peak.

    python bench.py                      # the default model of train.py
    python bench.py --n-embd 256 --device cuda --dtype float16

Each variant is a training run built as train.py builds one, and each step is train.py's own `train_step`
(learning rate, clip, NaN guard, the one sync), so every train.py flag about the model, NITP, the batch, the
optimizer, the device, the dtype and --compile applies. Refused: the flags of a run's length, evaluation and
output, and --n-expert / --top-k, since the MoE variants are bench.py's own (E = 8, 16, 32 with k = 1 or 2;
--n-shared, --n-dense-layers and the router coefficients apply). All variants are built in one process and
timed in interleaved rounds, so that a noisy, shared machine slows them alike; the table reports the median
round. The matmul peak (a square GEMM in the training dtype) is measured in every round too (it moves with the
machine's load and clock), and the fraction of peak uses its median; the range is printed beside it.

FLOPs per token are counted analytically, as in the PaLM paper (model.flops_per_token).
"""
import argparse
import statistics
import sys
import time

import torch

import machinery
import train
from model import flops_per_token, model_size


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, min_seconds: float = 0.05) -> float:
    """FLOP/s of back-to-back square GEMMs in the dtype that training uses. Timed over at least min_seconds
    between two syncs: one 2048³ GEMM takes tens of µs on a large GPU, as long as a launch and a sync."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty_like(a)
    torch.matmul(a, b, out=out)  # warm-up: the library picks its kernel
    repeats = 1
    while True:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b, out=out)
        sync(device)
        seconds = time.perf_counter() - t0
        if seconds >= min_seconds:
            return 2 * n ** 3 * repeats / seconds
        repeats *= 2


def sync(device: torch.device) -> None:
    """Wait for the work queued on the device: GPU timings without it measure only the queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# Flags bench.py refuses: they set a run's length, evaluation and output, or the MoE shape that its own variants
# set. Every other flag of train.py reaches the timed runs, as it would reach a training run.
REFUSED = ("n_expert", "top_k", "max_iters", "warmup_iters", "eval_interval", "eval_iters", "log_interval",
           "out_dir", "resume")
VARIANTS = {  # name: (n_expert, top_k, NITP on)
    "NTP (dense)": (1, 1, False), "NITP (dense)": (1, 1, True),
    "NTP, MoE E=8 k=1": (8, 1, False), "NTP, MoE E=8 k=2": (8, 2, False), "NTP, MoE E=16 k=2": (16, 2, False),
    "NTP, MoE E=32 k=2": (32, 2, False), "NITP, MoE E=8 k=2": (8, 2, True),
}


def make_parser():
    parser = machinery.make_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps-per-round", type=int, default=5, help="training steps per variant per round")
    parser.add_argument("--profile", action="store_true", help="also: where dense NTP's step time goes, by op")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = make_parser()
    given = [flag for flag in ("--" + name.replace("_", "-") for name in REFUSED)
             if any(a == flag or a.startswith(flag + "=") for a in argv)]
    if given:
        parser.error(f"bench.py times training steps of its own variants: drop {', '.join(given)}")
    args = machinery.parse_args(argv, parser=parser)
    try:
        runs = {}
        for name, (n_expert, top_k, use_nitp) in VARIANTS.items():
            variant = argparse.Namespace(**{**vars(args), "n_expert": n_expert, "top_k": top_k, "nitp": use_nitp})
            runs[name] = train.setup(variant)
    except ValueError as e:
        machinery.fail(str(e), program="bench.py")
    device, dtype = runs["NTP (dense)"].device, runs["NTP (dense)"].precision.dtype
    loss_fns = {name: train.training_loss(run) for name, run in runs.items()}

    def run_steps(name: str) -> float:
        """ms per step of `name`, over --steps-per-round steps of train.py's own train_step."""
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps_per_round):
            train.train_step(runs[name], loss_fns[name])
        sync(device)
        return 1000 * (time.perf_counter() - t0) / args.steps_per_round

    for name in runs:  # warm-up: allocator, kernels, lazy init, compilation
        run_steps(name)
    times, peaks = {name: [] for name in runs}, []
    for _ in range(args.rounds):
        peaks.append(matmul_peak(device, dtype))
        for name in runs:
            times[name].append(run_steps(name))
    peak = statistics.median(peaks)

    tokens = args.batch_size * args.grad_accum * args.block_size
    base_ms = statistics.median(times["NTP (dense)"])
    base_flops = flops_per_token(runs["NTP (dense)"].model, None)
    print(f"device {device} | {str(dtype).removeprefix('torch.')} | threads {torch.get_num_threads()} | "
          f"{args.grad_accum} x {args.batch_size} x {args.block_size} tokens per step"
          f" | matmul peak {peak / 1e9:.0f} GFLOP/s (median of {len(peaks)} rounds; "
          f"{min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f})")
    print(f"{'variant':20s} {'params':>14s} {'MFLOP/tok':>10s} {'ms/iter':>8s} {'tok/s':>8s} "
          f"{'of peak':>8s} {'time x':>7s} {'FLOPs x':>8s}")
    for name, run in runs.items():
        ms = statistics.median(times[name])
        flops = flops_per_token(run.model, run.nitp)
        print(f"{name:20s} {model_size(run.model):>14s} {flops / 1e6:10.2f} {ms:8.1f} {tokens / ms * 1e3:8.0f} "
              f"{flops * tokens / (ms / 1e3) / peak:8.1%} {ms / base_ms:7.2f} {flops / base_flops:8.2f}")
    nitp_ms = statistics.median(times["NITP (dense)"])
    nitp_flops = flops_per_token(runs["NITP (dense)"].model, runs["NITP (dense)"].nitp)
    print(f"NITP overhead: analytic {nitp_flops / base_flops - 1:+.1%} FLOPs (6·12d² per token), "
          f"measured {nitp_ms / base_ms - 1:+.1%} wall-clock; at inference the head is dropped: +0%")
    if args.profile:
        profile(lambda: run_steps("NTP (dense)"), device)


def profile(run_steps, device: torch.device, top: int = 10) -> None:
    """The ops that take the most of a dense NTP step's time (torch.profiler, self time, forward and backward)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run_steps()
    events = prof.key_averages()
    # GPU time where there is a GPU (the attribute's name changed in torch 2.4), else CPU time
    attr = next((a for a in ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda"
                 and hasattr(events[0], a)), "self_cpu_time_total")
    total = sum(getattr(e, attr) for e in events)
    print(f"where dense NTP's step time goes ({attr}, all ops = 100%):")
    if device.type == "mps":  # torch.profiler has no MPS activity: it times the CPU's side only
        print("  (on MPS these are the CPU's times to dispatch each op, not the GPU's times to run it)")
    for e in sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]:
        print(f"  {getattr(e, attr) / total:6.1%}  {e.key}")


if __name__ == "__main__":
    machinery.printable_output()  # before anything prints: a console that cannot hold a character must not crash
    main()
