"""Tests of training, evaluation, checkpoints and resume, bad input, DDP (train.py, machinery.py)."""
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import machinery
import train
from conftest import (HERE, TINY, exact, poison_the_gradients, poison_the_nitp_loss, poison_training_loss, read_metrics,
                      same, tiny_model)

# ---------------------------------------------------------------------------------------------------- train.py

def test_training_writes_metrics_and_a_weights_only_checkpoint(device, tmp_path, capsys):
    """A short run logs every step and every eval, and its checkpoint loads with weights_only=True."""
    out = tmp_path / "run"
    train.main(TINY + ["--nitp", "--device", device, "--max-iters", "6", "--eval-interval", "3", "--out-dir", str(out)])
    records = read_metrics(out)
    assert [r["step"] for r in records if not r.get("eval")] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in records if r.get("eval")]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(r["val_nitp"] is not None and r["erank"] >= 1 and -1 <= r["anisotropy"] <= 1 for r in evals)
    assert all(len(r["erank_by_layer"]) == 2 + 1 for r in evals)  # the embeddings and each of the 2 blocks
    assert all({"lm", "nitp", "loss"} <= set(r) for r in records if not r.get("eval"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["args"]["nitp"] and "versions" in ckpt and ckpt["nitp"] is not None
    assert "ms/iter" in capsys.readouterr().out


def test_moe_training_logs_the_aux_loss_and_expert_shares(device, tmp_path, capsys):
    """With --n-expert, every step logs the MoE aux loss apart, and every eval logs each expert's share."""
    out = tmp_path / "moe"
    train.main(TINY + ["--nitp", "--device", device, "--n-expert", "4", "--top-k", "2", "--max-iters", "2",
                       "--eval-interval", "2", "--out-dir", str(out)])
    records = read_metrics(out)
    assert all({"lm", "nitp", "moe_aux"} <= set(r) for r in records if not r.get("eval"))
    evals = [r for r in records if r.get("eval")]
    assert all(len(r["expert_share"]) == 1 and len(r["expert_share"][0]) == 4 and r["max_load"] >= 1 for r in evals)
    printed = capsys.readouterr().out
    assert "-A" in printed.splitlines()[0] and "busiest expert" in printed


@pytest.mark.parametrize("model_flags", [[], ["--n-expert", "4", "--top-k", "2"], ["--dtype", "float16"]],
                         ids=["dense", "moe", "fp16-with-scaler"])
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(model_flags, device, tmp_path, monkeypatch, capsys):
    """Ctrl-C saves a checkpoint; --resume continues with the same per-step losses and the same final
    weights, bit for bit, as a run that was never interrupted (NITP on; dense, MoE, and fp16 autocast, whose
    gradient scaler's state travels in the checkpoint). On CUDA with --deterministic; on MPS to 1e-5."""
    if device == "mps" and "float16" in model_flags:
        pytest.skip("MPS trains in float32 only")
    args = TINY + model_flags + exact(device) + ["--nitp", "--max-iters", "10", "--eval-interval", "4"]
    train.main(args + ["--out-dir", str(tmp_path / "a")])

    real_get_batch, calls = train.get_batch, []

    def interrupt_at_step_6(tokens, *rest):
        calls.append(1)
        if len(calls) == 6:  # one batch per step (the validation windows are cut in order, not drawn)
            signal.raise_signal(signal.SIGINT)
        return real_get_batch(tokens, *rest)

    monkeypatch.setattr(train, "get_batch", interrupt_at_step_6)
    with pytest.raises(SystemExit) as exit_info:
        train.main(args + ["--out-dir", str(tmp_path / "b")])
    assert exit_info.value.code == 130 and "--resume" in capsys.readouterr().out
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 6
    monkeypatch.setattr(train, "get_batch", real_get_batch)
    train.main(["--resume", "--out-dir", str(tmp_path / "b")])

    losses = [[r["loss"] for r in read_metrics(tmp_path / run) if not r.get("eval")] for run in "ab"]
    assert len(losses[0]) == 10 and same(losses[0], losses[1], device)
    scalers = [torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["scaler"] for run in "ab"]
    assert scalers[0] == scalers[1] and (scalers[0] != {}) == ("float16" in model_flags)
    weights = [torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["model"] for run in "ab"]
    assert all(same(weights[0][k], weights[1][k], device) for k in weights[0])


def train_py(*argv: str, launcher: tuple[str, ...] = (), **popen_kw) -> subprocess.Popen:
    """`python [LAUNCHER] train.py ARGV` as a user starts it, one thread per process: the CPU may be shared."""
    env = {**os.environ, "NITP_CACHE_DIR": str(data.CACHE_DIR), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *launcher, "train.py", *argv], cwd=HERE, env=env, **popen_kw)


@pytest.mark.slow
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(device, tmp_path):
    """SIGKILL in the middle of writing a checkpoint leaves the previous ckpt.pt whole: it loads, and --resume
    finishes the run."""
    out = tmp_path / "run"
    run = train_py(*TINY, "--device", device, "--max-iters", "1000", "--eval-interval", "1", "--out-dir", str(out),
                   stdout=subprocess.DEVNULL)
    ckpt, partial = out / "ckpt.pt", out / f"ckpt.pt.tmp{run.pid}"  # data.atomic_write's temporary file
    try:  # freeze the run while it writes a checkpoint after the first one: then kill it
        deadline = time.monotonic() + 60
        while True:
            assert run.poll() is None and time.monotonic() < deadline, "never caught writing a second checkpoint"
            if ckpt.exists() and partial.exists():
                run.send_signal(signal.SIGSTOP)
                if partial.exists():
                    break
                run.send_signal(signal.SIGCONT)  # the write finished in between: try the next one
            time.sleep(0.001)
    finally:
        run.kill()
        run.wait()
    assert partial.exists()  # killed mid-write
    step = torch.load(ckpt, weights_only=True)["step"]
    resumed = train_py("--resume", "--max-iters", str(step + 2), "--out-dir", str(out), stdout=subprocess.DEVNULL)
    assert resumed.wait(timeout=60) == 0
    assert torch.load(ckpt, weights_only=True)["step"] == step + 2


@pytest.mark.slow
@pytest.mark.parametrize("model_flags", [["--nitp-start", "2"], ["--n-expert", "4", "--top-k", "2", "--aux-loss-coef", "0"]],
                         ids=["head-idle-at-first", "moe"])
def test_two_ddp_processes_follow_one_process_with_the_same_global_batch(model_flags, device, tmp_path):
    """torchrun with 2 processes (gloo on the CPU, nccl on 2 GPUs) of 4 sequences each logs the losses, within
    1e-5 (float32 rounding), of one process of 8 sequences: the ranks split the same batches and average the
    gradients of the backbone and of the NITP head, with --grad-accum 2. With --nitp-start 2 the head has no
    gradient in the first steps (DDP must search for unused parameters); with MoE, every expert gets one, even
    with no token (DDP need not search: if it had to, it would stop with an error). The balancing loss is off
    there: a product of batch statistics, which a mean over the ranks does not reproduce."""
    if device == "mps" or (device == "cuda" and torch.cuda.device_count() < 2):
        pytest.skip("DDP here needs the CPU or 2 CUDA GPUs")
    args = [*TINY, *model_flags, "--device", device, "--nitp", "--grad-accum", "2", "--max-iters", "4",
            "--eval-interval", "4"]
    with open(tmp_path / "torchrun.log", "w") as log:
        ddp = train_py(*args, "--out-dir", str(tmp_path / "ddp"), stdout=log, stderr=log,
                       launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
        train.main(args + ["--batch-size", "8", "--out-dir", str(tmp_path / "one")])  # meanwhile, in this process
        assert ddp.wait(timeout=120) == 0, (tmp_path / "torchrun.log").read_text()[-2000:]
    steps = [[r for r in read_metrics(tmp_path / run) if not r.get("eval")] for run in ("one", "ddp")]
    assert [r["step"] for r in steps[1]] == [1, 2, 3, 4]
    for single, ddp_step in zip(*steps):
        assert ddp_step.keys() == single.keys()
        for term in ("loss", "lm", "nitp", "grad_norm"):
            if term in single:
                assert ddp_step[term] == pytest.approx(single[term], abs=1e-5), (single["step"], term)


@pytest.mark.parametrize("poison,message", [(poison_the_nitp_loss, "step 6: the nitp loss is nan"),
                                            (poison_the_gradients, "step 6: the gradient norm is")])
def test_a_non_finite_loss_or_gradient_stops_the_run_and_keeps_the_checkpoint(poison, message, device, tmp_path,
                                                                               monkeypatch, capsys):
    """From step 6 on, a loss term is NaN or the gradients are infinite: the run exits with status 3 and one line
    naming the step and what went bad, and ckpt.pt (step 4) is left exactly as it was."""
    out = tmp_path / "run"
    checkpoint_before = []
    poison_training_loss(monkeypatch, poison, when=lambda step: step >= 6,
                         then=lambda: checkpoint_before.append((out / "ckpt.pt").read_bytes()))
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--nitp", "--device", device, "--max-iters", "10", "--eval-interval", "4", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 3
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert (out / "ckpt.pt").read_bytes() == checkpoint_before[0]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4


BAD_INPUTS = {
    "missing corpus": (["--data", "no/such/file.txt"], "not found"),
    "empty corpus": (["--data", "{empty}"], "empty"),
    "corpus not UTF-8": (["--data", "{latin1}"], "not UTF-8"),
    "corpus too short": (["--data", "{short}"], "--block-size"),
    "n_embd not divisible by n_head": (["--n-embd", "30", "--n-head", "4"], "divisible"),
    "target layer out of range": (["--nitp", "--n-layer", "2", "--nitp-layer", "2"], "0..1"),
    "negative lambda": (["--nitp", "--nitp-lambda", "-1"], "lambda"),
    "bad flag": (["--n-layers", "3"], "unrecognized"),
    "top-k above the number of experts": (["--n-expert", "4", "--top-k", "5"], "--top-k"),
    "bad number": (["--max-iters", "0"], "--max-iters"),
    "resume without checkpoint": (["--resume"], "no checkpoint"),
    "resume with a damaged checkpoint": (["--resume", "--out-dir", "{damaged}"], "damaged"),
    "resume with a foreign file": (["--resume", "--out-dir", "{foreign}"], "not a version-1"),
    "resume with a truncated checkpoint": (["--resume", "--out-dir", "{truncated}"], "damaged"),
    "resume with parts of a checkpoint missing": (["--resume", "--out-dir", "{incomplete}"], "not a version-1"),
    "out-dir is a file": (["--out-dir", "{empty}"], "is a file"),
    "out-dir below a file": (["--out-dir", "{empty}/run"], "is a file"),
    "out-dir that cannot be created": (["--out-dir", "/proc/nitp-run"], "cannot write"),
    "infinite learning rate": (["--learning-rate", "inf"], "finite"),
    "NaN lambda": (["--nitp", "--nitp-lambda", "nan"], "finite"),
    "an experiment's flag": (["--seeds", "3"], "unrecognized"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_line_and_writes_nothing(case, tmp_path, capsys):
    """Each bad input: exit code 2, one line on stderr that says what to do, no traceback, no output dir."""
    argv, expected = BAD_INPUTS[case]
    files = {"empty": "", "latin1": "caf\xe9".encode("latin-1"), "short": "just a few words"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content.encode() if isinstance(content, str) else content)
    saved = io.BytesIO()  # torch.save of a dict with tensors, as train.py writes; cut in half below
    torch.save({"format_version": machinery.VERSION, "step": 1, "model": tiny_model().state_dict()}, saved)
    checkpoints = {"damaged": b"PK\x03\x04 truncated", "foreign": {"some": "thing"},
                   "truncated": saved.getvalue()[:len(saved.getvalue()) // 2],
                   "incomplete": {"format_version": machinery.VERSION, "step": 1}}
    for name, content in checkpoints.items():
        (tmp_path / name).mkdir()
        if isinstance(content, dict):
            torch.save(content, tmp_path / name / "ckpt.pt")
        else:
            (tmp_path / name / "ckpt.pt").write_bytes(content)
    argv = [a.format(**{n: str(tmp_path / n) for n in [*files, *checkpoints]}) for a in argv]
    out_dir = tmp_path / "out"
    if "--out-dir" not in argv:
        argv += ["--out-dir", str(out_dir)]
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err
    assert not out_dir.exists()


def test_every_float_flag_refuses_non_finite_numbers(capsys):
    float_flags = [a.option_strings[0] for a in machinery.make_parser()._actions if a.type is machinery.finite_float]
    assert len(float_flags) >= 6
    for flag in float_flags:
        for value in ("inf", "-inf", "nan"):
            with pytest.raises(SystemExit) as exit_info:
                machinery.parse_args([f"{flag}={value}"])
            assert exit_info.value.code == 2 and "finite" in capsys.readouterr().err, (flag, value)


def test_the_command_line_is_built_from_the_settings_at_the_top_of_train_py(tmp_path, monkeypatch, capsys):
    """Each line `name = default  # help` of train.py's settings is the flag --name with that default, and --help
    lists it with its help; an edited default is the new default; a line in another form stops the parser with
    its line, rather than losing a flag."""
    args = machinery.parse_args([])
    computed = {"warmup_iters": 100, "eval_interval": 100}  # None in the block: a tenth of max_iters
    assert len(vars(args)) == 39 and all(value == computed.get(name, getattr(train, name))
                                         for name, value in vars(args).items())
    with pytest.raises(SystemExit):
        machinery.parse_args(["--help"])
    listed = " ".join(capsys.readouterr().out.split())  # argparse wraps the help over lines
    assert all(f"--{name.replace('_', '-')}" in listed for name in vars(args))
    assert "λ, the weight of the NITP loss (default: 1.0)" in listed
    assert "on CUDA, runs and resumes that repeat bit for bit, somewhat slower" in listed  # a continued comment
    source = machinery.SETTINGS.read_text()
    monkeypatch.setattr(machinery, "SETTINGS", tmp_path / "train.py")
    machinery.SETTINGS.write_text(source.replace("max_iters = 1000 ", "max_iters = 300  "))
    assert machinery.parse_args([]).max_iters == 300 and machinery.parse_args([]).warmup_iters == 30
    machinery.SETTINGS.write_text(source.replace("seed = 1337                 # seed for", "seed = 1337 seed for"))
    with pytest.raises(SyntaxError, match="seed = 1337 seed for"):
        machinery.make_parser()


def test_under_torchrun_a_user_error_is_printed_once(tmp_path, monkeypatch, capsys):
    """Every rank exits with status 2, but only rank 0 says why."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        for argv in (["--n-layers", "3"], ["--data", str(tmp_path / "missing.txt")]):
            with pytest.raises(SystemExit) as exit_info:
                train.main(argv + ["--out-dir", str(tmp_path / "out")])
            assert exit_info.value.code == 2 and bool(capsys.readouterr().err) == printed


def test_resume_with_another_number_of_processes_is_refused(tmp_path, capsys):
    """An exact continuation needs the world size the checkpoint was written with (the batches are sliced by
    rank): a mismatch is refused with the command that fits."""
    out = tmp_path / "run"
    train.main(TINY + ["--max-iters", "2", "--out-dir", str(out)])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["world_size"] == 1
    ckpt["world_size"] = 2
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--nproc_per_node=2" in err and len(err.strip().splitlines()) == 1


def test_resume_with_a_different_model_shape_is_refused(tmp_path, capsys):
    """A checkpoint from another config cannot be resumed with conflicting flags; the error says which flag."""
    out = str(tmp_path / "run")
    train.main(TINY + ["--max-iters", "2", "--out-dir", out])
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", "--out-dir", out, "--n-embd", "64"])
    assert exit_info.value.code == 2 and "--n-embd 32" in capsys.readouterr().err
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before


def test_resume_with_a_corrupt_generator_state_is_refused(tmp_path, capsys):
    """A checkpoint whose batch-generator state is garbage gives the one-line error, not a traceback."""
    out = tmp_path / "run"
    train.main(TINY + ["--max-iters", "2", "--out-dir", str(out)])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["rng"]["batches"] = torch.zeros(3, dtype=torch.uint8)
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "does not fit" in err and len(err.strip().splitlines()) == 1


def test_the_command_line_reports_errors_without_a_traceback(tmp_path):
    """As a user sees it: `python train.py --data missing.txt` prints one line and exits non-zero."""
    result = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "missing.txt"),
                             "--out-dir", str(tmp_path / "out")], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent, env={**os.environ, "NITP_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not found" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_resumed_optimizer_takes_this_devices_kernel_choice(device, tmp_path, monkeypatch):
    """A checkpoint written on the CPU, where AdamW loops over the parameters, resumes where AdamW runs fused
    (CUDA, MPS): the resumed optimizer stays fused, and under fp16 the gradient scaler, which hands its scale to
    a fused optimizer, takes real steps. On the CPU the fused choice is injected (fused AdamW runs there too)."""
    out = str(tmp_path / "run")
    train.main(TINY + ["--nitp", "--device", "cpu", "--dtype", "float16", "--max-iters", "4", "--eval-interval", "2",
                       "--out-dir", out])  # on the CPU, whatever device the resume then runs on
    assert not torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"][0]["fused"]
    if device == "cpu":
        monkeypatch.setattr(machinery, "optimizer_kernels", lambda device: {"fused": True})
    resumed = []
    real_restore = machinery.restore
    monkeypatch.setattr(machinery, "restore", lambda ckpt, **parts: (resumed.append(parts), real_restore(ckpt, **parts))[1])
    before = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    dtype = "float32" if device == "mps" else "float16"  # MPS trains in float32 only
    train.main(["--resume", "--device", device, "--dtype", dtype, "--max-iters", "10", "--out-dir", out])
    assert all(group["fused"] for group in resumed[0]["optimizer"].param_groups)
    steps = [r for r in read_metrics(out) if not r.get("eval") and r["step"] > 4]
    assert len(steps) == 6 and not all(r.get("skipped") for r in steps)
    after = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    assert not torch.equal(before["wte.weight"], after["wte.weight"])


def test_grad_clip_zero_measures_the_norm_and_leaves_the_gradients_alone(tmp_path):
    """--grad-clip 0 only measures the gradient norm: the step is the one of a bound that is never reached (not
    a clip to 0, which would leave AdamW nothing but the weight decay); a bound below the norm changes it."""
    weights, norms = {}, {}
    for clip in ("0", "1e9", "0.01"):
        run = train.setup(machinery.parse_args(TINY + ["--grad-clip", clip, "--out-dir", str(tmp_path)]))
        norms[clip] = train.train_step(run, train.training_loss(run)).values["grad_norm"]
        weights[clip] = run.model.state_dict()
    assert norms["0"] == norms["1e9"] == norms["0.01"] > 0.01
    assert all(torch.equal(weights["0"][k], weights["1e9"][k]) for k in weights["0"])
    assert not all(torch.equal(weights["0"][k], weights["0.01"][k]) for k in weights["0"])


@pytest.mark.slow
def test_moe_under_compile_runs_its_dispatch_eagerly_and_stops_recompiling(device, tmp_path, monkeypatch):
    """The MoE dispatch splits the tokens by counts that change every step. Compiled, it recompiled for new
    counts until dynamo's limit; left eager, the compiled graphs are all made in the first steps (training and
    evaluation) and none is added later, whatever the routing does."""
    if device == "mps":
        pytest.skip("--compile is refused on MPS")
    graphs_at_eval, real_evaluate = [], train.evaluate

    def counting(*args):
        graphs_at_eval.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return real_evaluate(*args)

    monkeypatch.setattr(train, "evaluate", counting)
    torch._dynamo.reset()
    train.main(TINY + ["--nitp", "--device", device, "--n-expert", "4", "--top-k", "2", "--compile",
                       "--max-iters", "12", "--eval-interval", "3", "--out-dir", str(tmp_path)])
    assert graphs_at_eval[1] > 0 and len(set(graphs_at_eval[1:])) == 1, graphs_at_eval  # steps 3 to 12
