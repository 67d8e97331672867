"""Tests of the NTP vs NITP experiment (compare.py) and of the frozen-representation tasks (probe.py)."""
import argparse
import json

import numpy as np
import pytest
import torch

import ablations
import compare
import machinery
import probe
import stats
import train
from conftest import TINY, exact, read_metrics, same, tiny_nitp
from model import GPT, GPTConfig, flops_per_token
from nitp import NITP, NITPConfig

# ---------------------------------------------------------------------------------------------------- compare.py

@pytest.mark.slow
def test_compare_starts_both_runs_from_the_same_weights_and_batches(device, tmp_path, monkeypatch, capsys):
    """compare.py: the NTP and NITP runs begin with identical backbone weights and see identical batches."""
    real_setup, real_get_batch = train.setup, train.get_batch
    initial_weights, batches = [], []

    def recording_setup(args, ckpt=None):
        run = real_setup(args, ckpt)
        initial_weights.append({k: v.clone() for k, v in run.model.state_dict().items()})
        batches.append([])
        return run

    def recording_get_batch(*a):
        x, y = real_get_batch(*a)
        if batches:
            batches[-1].append(x.clone())
        return x, y

    monkeypatch.setattr(train, "setup", recording_setup)
    monkeypatch.setattr(train, "get_batch", recording_get_batch)
    compare.main(TINY + ["--device", device, "--seeds", "1", "--max-iters", "4", "--eval-interval", "2",
                       "--out-dir", str(tmp_path)])
    ntp, nitp = initial_weights[-2:]  # the runs; compare.py first sets each up once to check its settings
    assert ntp.keys() == nitp.keys() and all(torch.equal(ntp[k], nitp[k]) for k in ntp)
    assert len(batches[-2]) == 2 + 4 and all(torch.equal(a, b) for a, b in zip(*batches[-2:]))
    printed = capsys.readouterr().out
    assert "step 2" in printed and "delta" in printed


def test_compare_with_seeds_writes_its_summary(device, tmp_path, capsys):
    """compare.py --seeds 2 finishes, writes both runs' metrics per seed, their probe scores, and a summary: each
    paired difference with its interval, the verdict, and what 2 seeds can settle."""
    compare.main(TINY + ["--device", device, "--seeds", "2", "--max-iters", "3", "--eval-interval", "3",
                       "--out-dir", str(tmp_path)])
    for run in ("seed1337-ntp", "seed1337-nitp", "seed1338-ntp", "seed1338-nitp"):
        assert any(r.get("eval") for r in read_metrics(tmp_path / run))
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["seeds"] == [1337, 1338]
    assert {"val_lm", "erank", "anisotropy", "ms_per_iter"} <= set(result["summary"])
    erank = result["summary"]["erank"]
    assert erank["std"] is not None and erank["verdict"] in ("as the paper says", "the opposite", "not settled by 2 seeds")
    assert erank["mean"] == pytest.approx(np.mean(np.array(erank["arm"]) - np.array(erank["baseline"])))
    low, high = erank["ci"]
    assert low < erank["mean"] < high and erank["half_width"] == pytest.approx((high - low) / 2)
    printed = capsys.readouterr().out
    assert "summary" in printed and "(1337-1338)" in printed and "time:" in printed
    assert f"eff. rank: {compare.interval(erank, '{:.2f}')}, NITP higher in" in printed
    assert "what 2 seeds can settle: the interval excludes 0 only for a difference larger than" in printed
    assert set(result["seconds"]) >= {"training steps", "evaluations", "probes"}
    assert set(result["summary"]["probes"]) == set(probe.TARGETS) and "probe_mean" in result["summary"]
    assert all(0 <= final[run]["probe:byte t+2"] <= 1 for final in result["finals"] for run in ("NTP", "NITP"))
    assert len(result["probe_baselines"]) == 2 and "frozen-state probes, balanced accuracy" in printed
    # Only the comparison's own runs: no third, stray training run in OUT_DIR itself.
    made = {p.name for p in tmp_path.iterdir()}
    assert made - {"compare.png"} == {"seed1337-ntp", "seed1337-nitp", "seed1338-ntp", "seed1338-nitp", "compare.json"}


def test_the_verdict_follows_from_the_interval():
    """The paper's direction excluded from 0: as the paper says; the other way: the opposite; 0 inside: not settled.
    The loss is 'not worse' only when the whole interval lies below the margin, and a harm is said even then."""
    def say(claim, low, high, n=5):
        return stats.verdict(claim, {"n": n, "ci": [low, high]}, margin=0.01)

    assert say("higher", 0.2, 1.0) == say("lower", -1.0, -0.2) == "as the paper says"
    assert say("higher", -1.0, -0.2) == say("lower", 0.2, 1.0) == "the opposite"
    assert say("higher", -0.1, 1.0, n=3) == say("lower", -1.0, 0.1, n=3) == "not settled by 3 seeds"
    assert say("not worse", -0.004, 0.008) == "not worse by more than the margin (+0.01): as the paper says"
    assert say("not worse", 0.002, 0.009).endswith("the interval excludes 0: NITP is worse, by less than the margin")
    assert say("not worse", -0.02, -0.001).endswith("and better: the interval lies below 0")
    assert say("not worse", -0.004, 0.012) == "not settled by 5 seeds: the interval reaches past the margin (+0.01)"
    assert say("not worse", 0.001, 0.012).endswith("; it excludes 0: NITP is worse")
    assert say("not worse", 0.011, 0.03) == "worse by more than the margin (+0.01): the opposite"
    assert stats.verdict("higher", stats.paired([1.0])) == "one seed: no interval, no verdict"


def test_the_19_earlier_seeds_give_the_interval_the_issue_computed():
    """The validation-loss differences NITP − NTP of the 19 fresh classroom seeds that RESULTS.md printed before
    the verdict became a test (1337-1339, 2000-2009, 4000-4002, 6000-6002), paired: mean +0.0060, 95% interval
    [+0.0006, +0.0114] (scipy.stats.t.interval gives the same), t test p 0.031, worse in 13 of 19."""
    deltas = [0.0129, -0.0082, 0.0034, 0.0062, -0.0010, 0.0203, -0.0082, 0.0173, -0.0176, 0.0175, 0.0050, 0.0200,
              0.0067, -0.0069, 0.0075, -0.0048, 0.0157, 0.0150, 0.0132]
    paired = stats.paired(deltas)
    assert paired["mean"] == pytest.approx(0.0060, abs=1e-12)
    assert paired["ci"] == pytest.approx([0.00062588, 0.01137412], abs=1e-8)
    assert paired["t_test_p"] == pytest.approx(0.030654, abs=1e-6) and (paired["higher"], paired["lower"]) == (13, 6)
    assert stats.verdict("not worse", paired).startswith("not settled by 19 seeds")


def test_student_t_matches_the_textbook_table():
    """The 97.5% quantiles of Student's t that the 95% interval uses, from the printed tables (and scipy's, where
    scipy is installed)."""
    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 18: 2.1009, 30: 2.0423, 42: 2.0181, 100: 1.9840}
    for df, t in table.items():
        assert stats.t_critical(df) == pytest.approx(t, abs=1e-4), df
    try:
        from scipy.stats import t as student
    except ImportError:
        return
    for df in (1, 2, 3, 7, 18, 41, 64, 200):
        assert stats.t_critical(df) == pytest.approx(student.ppf(0.975, df), rel=1e-9), df
        assert stats.t_two_sided_p(1.7, df) == pytest.approx(2 * student.sf(1.7, df), rel=1e-9), df


def test_seeds_to_settle_is_the_usual_sample_size():
    """n ≈ ((1.96 + 0.84) · std / mean)²: a difference of half its std needs 32 seeds for 80% power."""
    assert stats.seeds_to_settle(0.5, 1.0) == 32 and stats.seeds_to_settle(0.006, 0.0112) == 28
    assert stats.seeds_to_settle(1.0, None) is None and stats.seeds_to_settle(10.0, 1.0) == 2


@pytest.mark.slow
def test_pooling_two_invocations_equals_one_invocation_over_all_their_seeds(device, tmp_path, capsys):
    """compare.py --pool reads the compare.json of separate invocations and summarizes all their seeds as one
    invocation over the same seeds would."""
    common = TINY + exact(device) + ["--max-iters", "3", "--eval-interval", "3"]
    compare.main(common + ["--seeds", "2", "--out-dir", str(tmp_path / "both")])
    compare.main(common + ["--seeds", "1", "--out-dir", str(tmp_path / "first")])
    compare.main(common + ["--seed", "1338", "--seeds", "1", "--out-dir", str(tmp_path / "second")])
    compare.main(["--pool", str(tmp_path / "first"), str(tmp_path / "second"), "--out-dir", str(tmp_path / "pooled")])
    pooled = json.loads((tmp_path / "pooled" / "pooled.json").read_text())
    both = json.loads((tmp_path / "both" / "compare.json").read_text())
    assert pooled["seeds"] == both["seeds"] == [1337, 1338]
    for key in ("val_lm", "erank", "anisotropy"):
        assert same(pooled["summary"][key]["delta"], both["summary"][key]["delta"], device), key
    assert "pooled: 2 seeds from 2 invocations" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["another setting", "a seed twice", "no compare.json"])
def test_pooling_refuses_what_does_not_pool_with_one_line(case, tmp_path, capsys):
    """Invocations of different settings, a seed counted twice, or a folder without a finished comparison: one
    line that says what to do, exit status 2, and no pooled.json."""
    common = TINY + ["--seeds", "1", "--max-iters", "2", "--eval-interval", "2"]
    compare.main(common + ["--out-dir", str(tmp_path / "a")])
    second = {"another setting": common + ["--seed", "7", "--learning-rate", "1e-3"], "a seed twice": common,
              "no compare.json": None}[case]
    if second is not None:
        compare.main(second + ["--out-dir", str(tmp_path / "b")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--pool", str(tmp_path / "a"), str(tmp_path / "b"), "--out-dir", str(tmp_path / "pooled")])
    err = capsys.readouterr().err
    expected = {"another setting": "trained with --learning-rate 0.001", "a seed twice": "seed 1337 appears in more",
                "no compare.json": "cannot read"}[case]
    assert exit_info.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pooled" / "pooled.json").exists()


def test_compare_runs_three_seeds_of_train_pys_own_defaults():
    """compare.py is three seeds of the default run: the same model and schedule as `train.py --nitp`. Warm-up
    and evaluation follow --max-iters (a tenth each) unless given."""
    plain, compared = machinery.parse_args([]), compare.parse_args([])
    assert compared.seeds == 3
    # the pre-registered classroom setting (RESULTS.md, section 1)
    setting = {k: getattr(compared, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size",
                                                  "max_iters", "learning_rate", "warmup_iters", "data", "nitp_lambda")}
    assert setting == dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16, max_iters=1000,
                           learning_rate=2e-3, warmup_iters=100, data="python-docs", nitp_lambda=1.0)
    assert vars(plain) == {k: v for k, v in vars(compared).items() if k in compare.TRAIN_FLAGS}
    assert vars(compare.arms(compared, 1337, compare.arm_changes(compared))["NITP"]) == \
        {**vars(plain), "nitp": True, "out_dir": "out/seed1337-nitp"}
    chosen = machinery.parse_args(["--max-iters=60", "--eval-interval", "7"])
    assert (chosen.warmup_iters, chosen.eval_interval) == (6, 7)
    assert machinery.parse_args(["--max-iters", "3"]).eval_interval == 1


@pytest.mark.parametrize("argv, expected", [
    (["--resume"], "starts fresh runs: drop --resume"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--n-layer", "2", "--nitp-layer", "2"], "0..1"),
    (["--pool"], "expected at least one argument"),
])
def test_compare_refuses_bad_input_with_one_line_and_writes_nothing(argv, expected, tmp_path, capsys):
    """A bad flag, or a setting that one of its runs cannot train (checked before the first run): one line, exit
    status 2, no output folder."""
    with pytest.raises(SystemExit) as exit_info:
        compare.main(TINY + argv + ["--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_the_paper_overhead_runs_are_what_their_names_say(tmp_path):
    """--paper-overhead: NITP with its SwiGLU head narrowed to the paper's +2.3% of FLOPs, NTP stretched to that
    run's FLOPs, and NTP with one more block, whose 12d² weights are the full head's."""
    args = compare.parse_args(["--paper-overhead", "--out-dir", str(tmp_path)])
    changes = compare.arm_changes(args)
    assert list(changes) == ["NTP", "NITP", "NITP, small head", "NTP, small head's compute", "NTP, one more block"]
    width = changes["NITP, small head"]["nitp_head_width"]
    assert width == compare.paper_head_width(args) == 53                    # 3·128·53 weights, against 12·128²
    small = argparse.Namespace(**{**vars(args), **changes["NITP, small head"]})
    overhead = compare.flops(small, nitp=True) / compare.flops(args, nitp=False) - 1
    assert overhead == pytest.approx(compare.PAPER_OVERHEAD, abs=0.0005)
    assert changes["NTP, small head's compute"] == {"nitp": False, "max_iters": round(1000 * (1 + overhead)),
                                                    "warmup_iters": round(100 * (1 + overhead)),
                                                    "eval_interval": round(100 * (1 + overhead))}
    deeper = argparse.Namespace(**{**vars(args), "n_layer": 5})
    block, head = (compare.flops(deeper, nitp=False) - compare.flops(args, nitp=False),
                   compare.flops(args, nitp=True) - compare.flops(args, nitp=False))
    assert head == 6 * 12 * 128 ** 2                                     # the block adds its two norms and attention:
    assert block == head + 6 * 4 * 128 + 12 * 64 * 128                  # 1.5% of NITP's FLOPs on top


def test_a_narrow_head_has_its_width_and_is_refused_for_other_heads():
    """--nitp-head-width sets the SwiGLU head's hidden width (3·d·w weights); it means nothing for the others."""
    head = tiny_nitp(head_width=5).head
    assert (head.gate.out_features, head.up.out_features, head.down.in_features) == (5, 5, 5)
    assert sum(p.numel() for p in head.parameters()) == 3 * 16 * 5
    assert sum(p.numel() for p in tiny_nitp().head.parameters()) == 12 * 16 ** 2
    with pytest.raises(ValueError, match="swiglu head only"):
        NITPConfig(head="linear", head_width=5)


# ---------------------------------------------------------------------------------------------------- probe.py

def test_the_labels_are_what_the_text_says():
    """Each label at each position of a hand-made window, -1 where the window cannot tell."""
    text = b'ab\n  x"y(z\n'  # the window: a, b, newline, then a line indented by 2 with a quote and a bracket
    window = np.frombuffer(text + b"tail", dtype=np.uint8)
    out = probe.labels(window, [0], len(text))
    assert out["quote"][0].tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1, 1, 1]          # from the opening " on
    assert out["brackets"][0].tolist() == [-1, -1, -1, 0, 0, 0, 0, 0, 1, 1, 1]
    assert out["column"][0].tolist() == [-1, -1, -1] + [0] * 8                          # columns 0..7: bin 0
    assert out["indent"][0].tolist() == [-1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1]          # 2 spaces, once ended
    assert out["byte t-2"][0].tolist() == [-1, -1] + list(text[:-2])
    assert out["byte t+3"][0].tolist() == list((text + b"tail")[3:3 + len(text)])
    assert out["byte t+1"][0, -1] == ord("t")                                           # beyond the window: known


def test_a_probe_reads_a_planted_label_and_not_noise():
    """States that encode the label (a rotated one-hot, a little noise) score near 1; noise scores near chance,
    1/K in balanced accuracy, however unbalanced the classes."""
    g = torch.Generator().manual_seed(0)
    labels = np.concatenate([np.zeros(3000, dtype=np.int64), np.arange(2000) % 4 + 1])   # class 0 is 60%
    rotation = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    planted = (torch.nn.functional.one_hot(torch.from_numpy(labels), 32).float()
               + 0.1 * torch.randn(5000, 32, generator=g)) @ rotation
    noise = torch.randn(5000, 32, generator=g)
    half = np.random.default_rng(0).permutation(5000) < 2500        # the fitting half, at random
    for states, low, high in ((planted, 0.98, 1.0), (noise, 0.12, 0.28)):
        fit, score = probe.design(states[torch.from_numpy(half)], states[torch.from_numpy(~half)])
        assert low <= probe.probe(fit, labels[half], score, labels[~half]) <= high
    fit, score = probe.design(planted[torch.from_numpy(half)], planted[torch.from_numpy(~half)])
    only_one = np.where(labels[half] == 0, 0, -1)                     # one class left to fit: nothing to probe
    assert probe.probe(fit, only_one, score, labels[~half]) is None


def test_balanced_accuracy_weighs_every_class_alike():
    truth = np.array([0, 0, 0, 0, 1, 2])
    assert probe.balanced_accuracy(np.zeros(6, dtype=np.int64), truth, 3) == pytest.approx(1 / 3)
    assert probe.balanced_accuracy(truth, truth, 3) == 1.0


def test_the_recent_mean_is_causal_and_counts_what_the_window_holds():
    embeddings = torch.arange(10, dtype=torch.float32).view(1, 10, 1)
    means = probe.recent_mean(embeddings, n=3)[0, :, 0].tolist()
    assert means == [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]


def test_probe_py_scores_a_checkpoint_with_baselines(device, tmp_path, capsys):
    """`probe.py --out-dir` reads the checkpoint there, trains nothing, and reports the model at every depth, the
    three baselines and chance."""
    out = tmp_path / "run"
    train.main(TINY + ["--max-iters", "2", "--device", device, "--out-dir", str(out)])
    before = (out / "metrics.jsonl").read_text()
    probe.main(["--device", device, "--out-dir", str(out)])
    rows = json.loads((out / "probe.json").read_text())
    assert set(rows) == {"this model", "input embeddings alone", "mean of the last 8 input embeddings",
                         "untrained network, same shape", "chance"}
    assert set(rows["this model"]["probe"]) == set(probe.TARGETS)
    assert all(len(v) == 2 + 2 for v in rows["this model"]["probe_by_layer"].values())  # embeddings, 2 blocks, ln_f
    assert all(v is None or 0 <= v <= 1 for row in rows.values() for v in row.get("probe", row).values())
    assert (out / "metrics.jsonl").read_text() == before
    assert "frozen-state probes, balanced accuracy" in capsys.readouterr().out


def test_probe_py_refuses_a_folder_without_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        probe.main(["--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no checkpoint" in err and len(err.strip().splitlines()) == 1
    assert "resume" not in err  # probe.py resumes nothing: the line names what it does need


def test_probing_leaves_the_random_state_and_the_model_mode_as_they_were(device):
    """The probes and the untrained baseline seed themselves, but the caller's random state and the model's
    training mode come back unchanged: probing between two runs changes neither run."""
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=16)).to(device).train()
    tokens = np.frombuffer(b"some text,\n  with (lines) and \"quotes\"\n" * 40, dtype=np.uint8)
    probes = probe.Probes(tokens, 16)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probes.of_model(model)
    probes.baselines(model, seed=0)
    assert torch.equal(torch.rand(3), expected) and model.training


@pytest.mark.slow
def test_compare_with_compile_compiles_each_run_itself(device, tmp_path, monkeypatch):
    """With --compile, each run of compare.py compiles its own model, and its ms/iter includes the compile time,
    as a run on its own would: the NITP run does not reuse the code compiled for the NTP run before it."""
    if device == "mps":
        pytest.skip("--compile is refused on MPS")
    compiled_during, real_train = [], train.train

    def counting(run, **kw):
        before = torch._dynamo.utils.counters["frames"]["ok"]  # frames dynamo compiled so far
        records = real_train(run, **kw)
        compiled_during.append(torch._dynamo.utils.counters["frames"]["ok"] - before)
        return records

    monkeypatch.setattr(train, "train", counting)
    compare.main(TINY + ["--compile", "--device", device, "--seeds", "1", "--max-iters", "2", "--eval-interval", "2",
                       "--out-dir", str(tmp_path)])
    assert len(compiled_during) == 2 and all(n > 0 for n in compiled_during), compiled_during


def test_paired_statistics_give_the_textbook_answers():
    """Two-sided p of the paired t test at the 5% critical values of Student's t (df 1, 2, 4, 9), and of the
    exact sign test."""
    for t, df in ((12.706, 1), (4.303, 2), (2.776, 4), (2.262, 9)):
        n = df + 1
        deltas = [1.0 + (-1) ** i * 0.5 for i in range(n)]  # any sample: rescale it to the wanted t
        mean, std = np.mean(deltas), np.std(deltas, ddof=1)
        deltas = [d - mean + t * std / np.sqrt(n) for d in deltas]
        assert stats.t_test_p(deltas) == pytest.approx(0.05, abs=2e-4), df
        assert stats.paired(deltas)["ci"][0] == pytest.approx(0.0, abs=1e-3 * std), df  # the interval just reaches 0
    assert stats.t_test_p([0.1]) is None and stats.t_test_p([0.1, 0.1]) == 0.0
    assert stats.sign_test_p([1, 2, 3]) == 0.25 and stats.sign_test_p([1] * 5) == 0.0625
    assert stats.sign_test_p([1, 1, 1, 1, -1]) == 0.375 and stats.sign_test_p([1, -1]) == 1.0


def test_equal_compute_trains_ntp_for_nitps_flops_on_the_same_batches(device, tmp_path, capsys):
    """compare.py --equal-compute adds NTP trained for max_iters × (1 + NITP's analytic FLOP overhead) steps, its warm-up
    and evaluation interval stretched alike, from the same weights and on the same batches as the NTP run (its
    first max_iters batches are theirs). The summary and the plain words say both: at equal steps, at equal
    compute."""
    compare.main(TINY + exact(device) + ["--equal-compute", "--seeds", "1", "--max-iters", "20", "--eval-interval", "8",
                       "--out-dir", str(tmp_path)])
    result = json.loads((tmp_path / "compare.json").read_text())
    overhead = result["nitp_flop_overhead"]
    args = machinery.parse_args(TINY)
    with torch.device("meta"):
        model = GPT(train.model_config(args, 256))
        head = NITP(NITPConfig(), args.n_layer, args.n_embd)
    assert overhead == pytest.approx(flops_per_token(model, head) / flops_per_token(model, None) - 1)
    matched = read_metrics(tmp_path / "seed1337-ntp-equal-compute")
    steps = [r for r in matched if not r.get("eval")]
    stretch = 1 + overhead
    assert steps[-1]["step"] == round(20 * stretch) > 20
    assert [r["step"] for r in matched if r.get("eval")][:2] == [0, round(8 * stretch)]
    saved = torch.load(tmp_path / "seed1337-ntp-equal-compute" / "ckpt.pt", weights_only=True)["args"]
    assert saved["warmup_iters"] == round(2 * stretch) and not saved["nitp"]
    ntp = [r for r in read_metrics(tmp_path / "seed1337-ntp") if not r.get("eval")]
    assert same(steps[0]["loss"], ntp[0]["loss"], device)  # same weights, same first batch
    printed = capsys.readouterr().out
    assert "at equal steps: eff. rank" in printed and "at equal compute: eff. rank" in printed
    assert "checked against the clock" in printed and result["summary_equal_compute"]["erank"]["t_test_p"] is None


def test_the_ablation_table_runs_every_switch_beside_the_papers_numbers(device, tmp_path, capsys):
    """ablations.py trains NTP, NITP and one run per ablation switch for each seed, and prints and saves the
    table of deltas against NTP with the paper's score beside each row."""
    ablations.main(TINY + ["--device", device, "--seeds", "2", "--max-iters", "2", "--out-dir", str(tmp_path)])
    table = json.loads((tmp_path / "ablations.json").read_text())["table"]
    assert list(table) == ["NITP", *ablations.ABLATIONS]
    assert all(len(row["erank"]["delta"]) == 2 and row["erank"]["t_test_p"] is not None for row in table.values())
    # each ablation against NITP itself, paired by seed: the difference of the two differences to NTP
    for name in ablations.ABLATIONS:
        against = table[name]["erank"]["vs_nitp"]
        assert against["delta"] == pytest.approx([a - b for a, b in zip(table[name]["erank"]["delta"],
                                                                       table["NITP"]["erank"]["delta"])])
        assert against["ci"][0] <= against["mean"] <= against["ci"][1]
    assert "vs_nitp" not in table["NITP"]["erank"]
    printed = capsys.readouterr().out
    assert "ablations: final evaluation, run − NTP" in printed and "18.23" in printed and "23.58" in printed
    assert "ablations: final evaluation, ablation − NITP" in printed
    args = json.loads((tmp_path / "seed1337-start-half-way" / "metrics.jsonl").read_text().splitlines()[1])
    assert args["step"] == 1 and "nitp" not in args  # NITP switched on at step 1 of 2, not before
    assert torch.load(tmp_path / "seed1338-no-head" / "ckpt.pt", weights_only=True)["args"]["nitp_head"] == "none"
