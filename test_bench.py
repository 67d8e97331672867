"""Tests of the speed report (bench.py)."""

import pytest
import torch

import bench
import model
import machinery
import train
from conftest import TINY, tiny_model, tiny_nitp

SHAPE = TINY[:TINY.index("--eval-iters")]  # the model and batch of TINY: bench.py takes no evaluation flags

# A value other than the default for each train.py flag that bench.py uses
USED = {"nitp": [], "nitp_lambda": ["0.5"], "nitp_layer": ["0"], "nitp_shift": ["0"], "nitp_no_stopgrad": [],
        "nitp_head": ["linear"], "nitp_head_width": ["7"], "nitp_loss": ["mse"], "nitp_start": ["3"], "nitp_shuffled_target": [],
        "data": ["shakespeare"],
        "tokenizer": ["gpt2"], "n_layer": ["3"], "n_head": ["1"], "n_embd": ["48"], "block_size": ["8"],
        "n_shared": ["1"], "n_dense_layers": ["2"], "aux_loss_coef": ["0.5"], "z_loss_coef": ["0.5"],
        "batch_size": ["3"], "grad_accum": ["2"], "learning_rate": ["0.5"], "weight_decay": ["0.5"],
        "grad_clip": ["0.5"], "seed": ["7"], "device": ["meta"], "dtype": ["bfloat16"], "compile": [],
        "deterministic": []}


def test_the_speed_report_refuses_the_flags_it_would_ignore(capsys):
    for name in bench.REFUSED:
        flag = "--" + name.replace("_", "-")
        with pytest.raises(SystemExit) as exit_info:
            bench.main([*SHAPE, f"{flag}=1" if name != "resume" else flag])
        assert exit_info.value.code == 2 and flag in capsys.readouterr().err, flag


def test_every_other_flag_reaches_each_timed_run_as_it_would_reach_a_training_run(monkeypatch):
    """Each variant is built by train.py's own setup() from the full command line: the flags that
    bench.py does not refuse all arrive, with only the MoE shape and NITP switch set per variant."""
    dests = {a.dest for a in machinery.make_parser()._actions if a.dest != "help"}
    assert dests == set(USED) | set(bench.REFUSED)  # a new train.py flag must be used or refused here
    built = []

    def stop_at_setup(args):
        built.append(args)
        if len(built) == len(bench.VARIANTS):
            raise ValueError("stop")  # bench.py turns this into its one-line error

    monkeypatch.setattr(train, "setup", stop_at_setup)
    for name, value in USED.items():
        flag = "--" + name.replace("_", "-")
        built.clear()
        with pytest.raises(SystemExit):
            bench.main([*SHAPE, flag, *value])
        default = machinery.make_parser().get_default(name)
        assert len(built) == len(bench.VARIANTS)
        if name != "nitp":  # the NITP switch is the variant's own
            assert all(getattr(args, name) != default for args in built), flag


def test_flops_per_token_add_the_head_and_count_only_the_k_experts_a_token_uses():
    """bench.py: the NITP head adds 6 · 12d² per token; top-2 of 8 experts costs one more expert per MoE layer
    (4 layers, the first dense: 3 MoE layers) than top-1, whatever E is."""
    d, dense = 16, tiny_model()
    assert model.flops_per_token(dense, tiny_nitp(d=d)) - model.flops_per_token(dense, None) == 6 * 12 * d * d
    k1, k2 = tiny_model(n_expert=8, experts_per_token=1), tiny_model(n_expert=8, experts_per_token=2)
    expert = sum(p.numel() for p in k1.blocks[-1].mlp.experts[0].parameters())
    assert model.flops_per_token(k2, None) - model.flops_per_token(k1, None) == 6 * 3 * expert
    assert model.flops_per_token(dense, None) == 6 * (dense.num_params() - 16 * 16) + 12 * 4 * 16 * 16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_speed_report_prints_one_table_with_the_nitp_overhead(dtype, device, monkeypatch, capsys):
    """bench.py in each precision, with the op profile (on the CPU, bf16 and fp16 stand in for a GPU's)."""
    if device == "mps" and dtype != "float32":
        pytest.skip("MPS trains in float32 only")
    if device == "cuda" and dtype == "bfloat16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("this GPU has no native bfloat16")
    peaks = []
    real_peak = bench.matmul_peak
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: peaks.append(dtype) or real_peak(device, dtype, n=64))
    bench.main([*SHAPE, "--device", device, "--rounds", "2", "--steps-per-round", "1", "--dtype", dtype, "--profile"])
    printed = capsys.readouterr().out
    assert peaks == [getattr(torch, dtype)] * 2  # the peak GEMM runs in the training dtype, every round
    assert "matmul peak" in printed and "NITP overhead: analytic" in printed and dtype in printed
    assert "where dense NTP's step time goes" in printed
    assert all(name in printed for name in ("NTP (dense)", "NITP (dense)", "NTP, MoE E=8 k=2", "NITP, MoE E=8 k=2"))
