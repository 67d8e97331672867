"""Speed report: what NITP and MoE cost per training step, against the machine's matmul peak.

    python bench.py                      # the default model of train.py
    python bench.py --n-embd 256 --device cuda --dtype float16

Takes train.py's flags for the model's shape, the batch, the corpus, the device and the dtype. Its MoE
variants are its own (E = 8, 16, 32 with k = 1 or 2; --n-shared and --n-dense-layers apply), and it times
eager steps of one micro-batch: --n-expert, --top-k, --compile and --grad-accum are refused. All variants are built in one process and timed in interleaved
rounds, so that a noisy, shared machine slows them alike; the table reports the median round. The matmul
peak (a square GEMM in the training dtype) is measured in every round too (it moves with the machine's load
and clock), and the fraction of peak uses its median; the range is printed beside it.

FLOPs per token are counted analytically (as in the PaLM paper): 6 FLOPs per weight a token passes through
(2 forward, 4 backward), counting k of the E routed experts and the tied LM head but not the embedding
lookups, plus attention, 12 · n_layer · block_size · d. The NITP head adds 6 · 12d².
"""
import statistics
import time
from dataclasses import replace

import torch

import train
from devices import autocast_for, grad_scaler, pick_device, pick_dtype
from data import get_batch, load_dataset
from model import GPT, GPTConfig
from nitp import NITP, NITPConfig, training_loss


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square GEMM in the dtype that training uses."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def sync(device: torch.device) -> None:
    """Wait for the work queued on the device: GPU timings without it measure only the queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def flops_per_token(model: GPT, nitp: NITP | None) -> float:
    c = model.config
    weights = model.num_params(active=True) - model.wpe.weight.numel()  # every weight a token passes through
    head = sum(p.numel() for p in nitp.parameters()) if nitp else 0
    return 6 * (weights + head) + 12 * c.n_layer * c.block_size * c.n_embd


def build(config: GPTConfig, use_nitp: bool, args, device):
    torch.manual_seed(args.seed)
    model = GPT(config).to(device)
    nitp = NITP(NITPConfig(lam=args.nitp_lambda, layer=args.nitp_layer), config.n_layer, config.n_embd).to(device) \
        if use_nitp else None
    optimizer = train.make_optimizer([model] + ([nitp] if nitp else []), args, device)
    return model, nitp, optimizer


def main() -> None:
    parser = train.make_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps-per-round", type=int, default=5, help="training steps per variant per round")
    parser.add_argument("--profile", action="store_true", help="also: where dense NTP's step time goes, by op")
    args = parser.parse_args()
    own = [flag for flag, default in (("n_expert", 1), ("top_k", 1), ("compile", False), ("grad_accum", 1))
           if getattr(args, flag) != default]
    if own:
        parser.error(f"bench.py times its own MoE variants, eager, one micro-batch per step: drop "
                     + ", ".join("--" + flag.replace("_", "-") for flag in own))
    try:
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        dataset = load_dataset(args.data, args.tokenizer, args.block_size)
        dense = GPTConfig(vocab_size=dataset.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd)
    except ValueError as e:
        train.fail(str(e))
    autocast = autocast_for(device, dtype)
    scaler = grad_scaler(device, dtype)
    moe = dict(n_dense_layers=args.n_dense_layers, n_shared=args.n_shared)
    variants = {
        "NTP (dense)": (dense, False),
        "NITP (dense)": (dense, True),
        "NTP, MoE E=8 k=1": (replace(dense, n_expert=8, top_k=1, **moe), False),
        "NTP, MoE E=8 k=2": (replace(dense, n_expert=8, top_k=2, **moe), False),
        "NTP, MoE E=16 k=2": (replace(dense, n_expert=16, top_k=2, **moe), False),
        "NTP, MoE E=32 k=2": (replace(dense, n_expert=32, top_k=2, **moe), False),
        "NITP, MoE E=8 k=2": (replace(dense, n_expert=8, top_k=2, **moe), True),
    }
    built = {name: build(config, use_nitp, args, device) for name, (config, use_nitp) in variants.items()}
    rng = torch.Generator().manual_seed(args.seed)
    batches = [tuple(t.to(device) for t in get_batch(dataset.train, args.batch_size, args.block_size, rng))
               for _ in range(args.steps_per_round)]

    def run_steps(model, nitp, optimizer) -> float:
        sync(device)
        t0 = time.perf_counter()
        for x, y in batches:
            with autocast:
                loss, _ = training_loss(model, nitp, x, y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        return 1000 * (time.perf_counter() - t0) / len(batches)

    for parts in built.values():  # warm-up: allocator, kernels, lazy init
        run_steps(*parts)
    times, peaks = {name: [] for name in built}, []
    for _ in range(args.rounds):
        peaks.append(matmul_peak(device, dtype))
        for name, parts in built.items():
            times[name].append(run_steps(*parts))
    peak = statistics.median(peaks)

    tokens = args.batch_size * args.block_size
    base_ms = statistics.median(times["NTP (dense)"])
    base_flops = flops_per_token(*built["NTP (dense)"][:2])
    print(f"device {device} | {str(dtype).removeprefix('torch.')} | threads {torch.get_num_threads()} | batch {args.batch_size} x {args.block_size} tokens"
          f" | matmul peak {peak / 1e9:.0f} GFLOP/s (median of {len(peaks)} rounds; "
          f"{min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f})")
    print(f"{'variant':20s} {'params':>14s} {'MFLOP/tok':>10s} {'ms/iter':>8s} {'tok/s':>8s} "
          f"{'of peak':>8s} {'time x':>7s} {'FLOPs x':>8s}")
    for name, (model, nitp, _) in built.items():
        ms = statistics.median(times[name])
        flops = flops_per_token(model, nitp)
        print(f"{name:20s} {train.param_name(model):>14s} {flops / 1e6:10.2f} {ms:8.1f} {tokens / ms * 1e3:8.0f} "
              f"{flops * tokens / (ms / 1e3) / peak:8.1%} {ms / base_ms:7.2f} {flops / base_flops:8.2f}")
    nitp_ms = statistics.median(times["NITP (dense)"])
    nitp_flops = flops_per_token(*built["NITP (dense)"][:2])
    print(f"NITP overhead: analytic {nitp_flops / base_flops - 1:+.1%} FLOPs (6·12d² per token), "
          f"measured {nitp_ms / base_ms - 1:+.1%} wall-clock; at inference the head is dropped: +0%")
    if args.profile:
        profile(lambda: run_steps(*built["NTP (dense)"]), device)


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
    for e in sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]:
        print(f"  {getattr(e, attr) / total:6.1%}  {e.key}")


if __name__ == "__main__":
    main()
