"""Tests of the NTP vs NITP experiment (compare.py), its summary, its controls and the ablation table (ablations.py)."""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ablations
import compare
import machinery
import probe
import stats
import train
from conftest import TINY, exact, read_metrics, same, tiny_model, tiny_nitp, tokens
from model import GPT, GPTConfig, flops_per_token
from nitp import NITP, NITPConfig, diagnostics, mean_direction_cos

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
    assert len(batches[-2]) == 4 and all(torch.equal(a, b) for a, b in zip(*batches[-2:]))  # a batch a step
    printed = capsys.readouterr().out
    assert "step 2" in printed and "delta" in printed


@pytest.mark.slow
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
    assert "what 2 seeds can settle: a mean difference farther than the interval's half-width from" in printed
    assert set(result["seconds"]) >= {"training steps", "evaluations", "probes"}
    assert set(result["summary"]["probes"]) == set(probe.TARGETS) and "probe_mean" in result["summary"]
    assert all(0 <= final[run]["probe:byte t+2"] <= 1 for final in result["finals"] for run in ("NTP", "NITP"))
    assert len(result["probe_baselines"]) == 2 and "frozen-state probes, balanced accuracy" in printed
    # Only the comparison's own runs: no third, stray training run in OUT_DIR itself.
    made = {p.name for p in tmp_path.iterdir()}
    assert made - {"compare.png"} == {"seed1337-ntp", "seed1337-nitp", "seed1338-ntp", "seed1338-nitp", "compare.json"}


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
    (["--lambdas", "0.1,,3"], "argument --lambdas: '' is not a number"),
    (["--lambdas", "0.3,abc"], "'abc' is not a number"),
    (["--lambdas", "0,1"], "λ must be a positive finite number, got 0"),
    (["--lambdas", "1,-0.5"], "λ must be a positive finite number, got -0.5"),
    (["--lambdas", "inf"], "λ must be a positive finite number, got inf"),
    (["--lambdas", "nan,1"], "λ must be a positive finite number, got nan"),
    (["--lambdas", "0.3,1,0.30"], "λ 0.3 is given twice"),
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
    run's FLOPs, and the control: NITP (the full head) with a shuffled target. Each comparison the summary makes
    is a pair of these runs: small head − NTP at equal steps and at its compute, small head − full head, and NITP −
    the shuffled-target control (the objective's content)."""
    args = compare.parse_args(["--paper-overhead", "--out-dir", str(tmp_path)])
    changes = compare.arm_changes(args)
    assert list(changes) == ["NTP", "NITP", "NITP, small head", "NTP, small head's compute", "NITP, shuffled target"]
    assert changes["NITP, shuffled target"] == {"nitp": True, "nitp_shuffled_target": True}
    control = compare.arms(args, 1337, changes)["NITP, shuffled target"]
    assert train.nitp_config(control) == NITPConfig(shuffled=True)  # the full head, the target shuffled: no other change
    pairs = {(arm, baseline): words for arm, baseline, words, _ in compare.COMPARISONS}
    assert pairs[("NITP, small head", "NITP")] == "small head against the full head"
    assert pairs[("NITP", "NITP, shuffled target")] == "the objective's content"
    assert all({arm, baseline} <= set(changes) for arm, baseline in pairs if arm != "NITP" or baseline != "NTP, equal compute")
    width = changes["NITP, small head"]["nitp_head_width"]
    assert width == compare.paper_head_width(args) == 53                    # 3·128·53 weights, against 12·128²
    small = argparse.Namespace(**{**vars(args), **changes["NITP, small head"]})
    overhead = compare.flops(small, nitp=True) / compare.flops(args, nitp=False) - 1
    assert overhead == pytest.approx(compare.PAPER_OVERHEAD, abs=0.0005)
    assert changes["NTP, small head's compute"] == {"nitp": False, "max_iters": round(1000 * (1 + overhead)),
                                                    "warmup_iters": round(100 * (1 + overhead)),
                                                    "eval_interval": round(100 * (1 + overhead))}


def test_a_narrow_head_has_its_width_and_is_refused_for_other_heads():
    """--nitp-head-width sets the SwiGLU head's hidden width (3·d·w weights); it means nothing for the others."""
    head = tiny_nitp(head_width=5).head
    assert (head.gate.out_features, head.up.out_features, head.down.in_features) == (5, 5, 5)
    assert sum(p.numel() for p in head.parameters()) == 3 * 16 * 5
    assert sum(p.numel() for p in tiny_nitp().head.parameters()) == 12 * 16 ** 2
    with pytest.raises(ValueError, match="swiglu head only"):
        NITPConfig(head="linear", head_width=5)


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


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert "ablations: final evaluation, ablation − NITP" in printed and "survives Holm's correction" in printed
    assert all(isinstance(row[key]["survives"], bool) for row in table.values() for key in ("val_lm", "erank"))
    args = json.loads((tmp_path / "seed1337-start-half-way" / "metrics.jsonl").read_text().splitlines()[1])
    assert args["step"] == 1 and "nitp" not in args  # NITP switched on at step 1 of 2, not before
    assert torch.load(tmp_path / "seed1338-no-head" / "ckpt.pt", weights_only=True)["args"]["nitp_head"] == "none"


# ---------------------------------------------------------------------------------------------------- --lambdas

def test_the_lambda_arms_are_nitp_at_each_other_lambda_and_nitps_own_is_the_run_nitp():
    """--lambdas 0.1,0.3,1,3: NTP, NITP (λ = 1, train.py --nitp's settings, so that it pairs with the classroom
    runs), and NITP at 0.1, 0.3 and 3 with only λ changed, each in a folder named for its λ; each λ arm is compared
    with NTP. The λ equal to --nitp-lambda is the run NITP, whichever it is."""
    args = compare.parse_args(["--lambdas", "0.1,0.3,1,3", "--seed", "8000"])
    changes = compare.arm_changes(args)
    assert changes == {"NTP": {"nitp": False}, "NITP": {"nitp": True}, "NITP, λ=0.1": {"nitp": True, "nitp_lambda": 0.1},
                       "NITP, λ=0.3": {"nitp": True, "nitp_lambda": 0.3}, "NITP, λ=3": {"nitp": True, "nitp_lambda": 3.0}}
    runs = compare.arms(args, 8000, changes)
    plain = machinery.parse_args(["--nitp", "--seed", "8000"])
    assert vars(runs["NITP"]) == {**vars(plain), "out_dir": "out/seed8000-nitp"}
    assert vars(runs["NITP, λ=0.3"]) == {**vars(plain), "nitp_lambda": 0.3, "out_dir": "out/seed8000-nitp-lambda-0.3"}
    assert [words for _, baseline, words, _ in compare.comparisons(set(changes)) if baseline == "NTP"] == \
        ["at equal steps", "λ = 0.1", "λ = 0.3", "λ = 3"]
    moved = compare.arm_changes(compare.parse_args(["--lambdas", "0.3,1", "--nitp-lambda", "0.3"]))
    assert list(moved) == ["NTP", "NITP", "NITP, λ=1"] and moved["NITP, λ=1"]["nitp_lambda"] == 1.0
    assert list(compare.arm_changes(compare.parse_args([]))) == ["NTP", "NITP"]  # without --lambdas: as before
    # a λ's name keeps every digit that tells it from another λ, and reads back as the same number
    for lam in (0.1, 3.0, 1e-5, 0.1234567, 0.1234568):
        assert compare.lambda_arms([compare.lambda_arm(lam)]) == {compare.lambda_arm(lam): lam}
    assert compare.lambda_arm(0.1234567) != compare.lambda_arm(0.1234568)


def lambda_finals(seeds: list[int], lambdas: list[float], rng: np.random.Generator) -> list[dict]:
    """fake_final's NTP and NITP per seed, and NITP at each λ: its differences to NTP scaled by λ, plus noise."""
    finals = []
    for seed in seeds:
        final = fake_final(seed, rng)
        ntp, nitp = final["NTP"], final["NITP"]
        for lam in lambdas:
            final[compare.lambda_arm(lam)] = {**nitp, **{key: ntp[key] + lam * (nitp[key] - ntp[key]) + rng.normal(0, 0.01)
                                                         for key in ("val_lm", "erank", "anisotropy", "probe_mean")}}
        finals.append(final)
    return finals


def test_the_lambda_study_gathers_each_lambdas_summary_against_ntp(capsys):
    """The study's rows, by λ: for each λ the mean, interval and verdict of NITP(λ) − NTP for the val loss, the
    effective rank, the anisotropy and the probe score, as that λ's summary gives them; λ = 1 is NITP − NTP."""
    finals = lambda_finals([1, 2, 3], [3.0, 0.3], np.random.default_rng(2))
    summary = compare.summaries(finals)
    assert list(summary) == ["at equal steps", "λ = 0.3", "λ = 3"]
    rows = compare.lambda_study(summary, set(finals[0]), nitp_lambda=1.0)
    assert [(row["lambda"], row["arm"]) for row in rows] == [(0.3, "NITP, λ=0.3"), (1.0, "NITP"), (3.0, "NITP, λ=3")]
    for row, words in zip(rows, ["λ = 0.3", "at equal steps", "λ = 3"]):
        assert set(row) == {"lambda", "arm", "val_lm", "erank", "anisotropy", "probe_mean"}
        for key in ("val_lm", "erank", "anisotropy", "probe_mean"):
            assert row[key] == {field: summary[words][key][field] for field in ("n", "mean", "ci", "half_width", "verdict")}
    delta = [f["NITP, λ=3"]["erank"] - f["NTP"]["erank"] for f in finals]
    assert rows[2]["erank"]["mean"] == pytest.approx(np.mean(delta))
    assert rows[2]["val_lm"]["verdict"] == stats.verdict("not worse", stats.paired(
        [f["NITP, λ=3"]["val_lm"] - f["NTP"]["val_lm"] for f in finals]))
    compare.print_lambda_study(rows)
    printed = capsys.readouterr().out
    assert "NITP(λ) − NTP at the end, by λ" in printed and "λ = 3 (NITP, λ=3)" in printed
    assert compare.interval(rows[2]["erank"], "{:.2f}") + "  " + rows[2]["erank"]["verdict"] in printed
    assert compare.lambda_study(compare.summaries(finals[:1]), {"NTP", "NITP"}, 1.0) == []  # no λ arm: no study


def test_the_lambda_plot_draws_each_lambda_at_its_loss_and_rank_difference(tmp_path, monkeypatch, capsys):
    """lambdas.png: one point per λ at (val loss difference, effective-rank difference), the 95% half-widths as
    error bars, labelled with its λ; the loss margin dashed, 0 drawn on both axes. One seed: points without bars.
    Without matplotlib: one line, no file."""
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.axes
    drawn, lines = [], []
    real_errorbar, real_axvline, real_axhline = (matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.axvline,
                                                 matplotlib.axes.Axes.axhline)

    def errorbar(self, x, y, xerr=None, yerr=None, **kw):
        drawn.append((x, y, xerr, yerr))
        return real_errorbar(self, x, y, xerr=xerr, yerr=yerr, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", errorbar)
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda self, x=0, **kw: lines.append(("x", x, kw.get("ls")))
                        or real_axvline(self, x, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, y=0, **kw: lines.append(("y", y, kw.get("ls")))
                        or real_axhline(self, y, **kw))
    finals = lambda_finals([1, 2, 3], [0.3, 3.0], np.random.default_rng(3))
    rows = compare.lambda_study(compare.summaries(finals), set(finals[0]), 1.0)
    compare.plot_lambdas(rows, tmp_path)
    assert (tmp_path / "lambdas.png").stat().st_size > 0
    assert drawn == [(row["val_lm"]["mean"], row["erank"]["mean"], row["val_lm"]["half_width"],
                      row["erank"]["half_width"]) for row in rows]
    assert all(xerr > 0 and yerr > 0 for _, _, xerr, yerr in drawn)
    assert ("x", stats.LOSS_MARGIN, "--") in lines and ("x", 0, None) in lines and ("y", 0, None) in lines
    drawn.clear()
    one = compare.lambda_study(compare.summaries(finals[:1]), set(finals[0]), 1.0)
    compare.plot_lambdas(one, tmp_path / "..")
    assert len(drawn) == 3 and all(xerr is None and yerr is None for _, _, xerr, yerr in drawn)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    (tmp_path / "lambdas.png").unlink()
    capsys.readouterr()
    compare.plot_lambdas(rows, tmp_path)
    assert capsys.readouterr().out.strip() == ("no plot: `pip install matplotlib` to get lambdas.png (everything else "
                                               "is in compare.json)")
    assert not (tmp_path / "lambdas.png").exists()


def test_pooling_summarizes_the_lambda_arms_that_every_folder_trained(tmp_path, capsys):
    """--pool over --lambdas comparisons: the λ study over all their seeds; a λ arm that only some folders trained
    is left out, and said so in one line."""
    rng = np.random.default_rng(4)
    settings = vars(compare.parse_args([]))

    def write(folder, seeds, lambdas):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "compare.json").write_text(json.dumps(
            {"seeds": seeds, "finals": lambda_finals(seeds, lambdas, rng), "args": {**settings, "lambdas": lambdas}}))

    write("a", [1, 2], [0.3, 3.0])
    write("b", [3], [0.3, 1.0, 3.0])  # with 1 (NITP's own λ, the run NITP), or without, the same runs
    write("c", [4], [0.3])
    pooled = compare.pool([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "p1"))
    assert [(row["lambda"], row["val_lm"]["n"]) for row in pooled["lambdas"]] == [(0.3, 3), (1.0, 3), (3.0, 3)]
    assert set(pooled["summaries"]) == {"at equal steps", "λ = 0.3", "λ = 3"}
    saved = json.loads((tmp_path / "p1" / "pooled.json").read_text())
    assert saved["lambdas"] == json.loads(json.dumps(pooled["lambdas"]))
    capsys.readouterr()
    mixed = compare.pool([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "p2"))
    assert [row["lambda"] for row in mixed["lambdas"]] == [0.3, 1.0]
    assert "left out, trained for some of these seeds only: NITP, λ=3" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- reuse

@pytest.mark.slow
def test_a_second_invocation_reuses_every_finished_run_and_lambdas_train_only_the_new_arms(device, tmp_path,
                                                                                           monkeypatch, capsys):
    """A finished run in its folder is not trained again: --lambdas over a plain comparison's folder reuses its NTP
    and NITP and trains only the other λ arms, and the same invocation again trains nothing and gives the same
    summaries. compare.json holds the study, and lambdas.png is drawn."""
    trained, real_train = [], train.train

    def spy(run, **kw):
        trained.append(Path(run.args.out_dir).name)
        return real_train(run, **kw)

    monkeypatch.setattr(train, "train", spy)
    common = TINY + exact(device) + ["--seeds", "1", "--max-iters", "3", "--eval-interval", "3", "--out-dir", str(tmp_path)]
    compare.main(common)
    assert trained == ["seed1337-ntp", "seed1337-nitp"]
    plain = json.loads((tmp_path / "compare.json").read_text())
    compare.main(common + ["--lambdas", "0.5,1,2"])
    assert trained[2:] == ["seed1337-nitp-lambda-0.5", "seed1337-nitp-lambda-2"]
    printed = capsys.readouterr().out
    assert f"seed 1337: NTP already trained in {tmp_path / 'seed1337-ntp'}, reused" in printed
    assert f"seed 1337: NITP already trained in {tmp_path / 'seed1337-nitp'}, reused" in printed
    first = json.loads((tmp_path / "compare.json").read_text())
    for key in ("val_lm", "erank", "anisotropy", "probe_mean", "probes"):  # the verdicts now carry a prefix
        assert first["summaries"]["at equal steps"][key] == plain["summaries"]["at equal steps"][key], key
    assert [(row["lambda"], row["arm"]) for row in first["lambdas"]] == [(0.5, "NITP, λ=0.5"), (1.0, "NITP"),
                                                                         (2.0, "NITP, λ=2")]
    assert set(first["lambdas"][0]) >= {"val_lm", "erank", "anisotropy", "probe_mean"}
    assert first["finals"][0]["NTP"]["reused"] and "reused" not in first["finals"][0]["NITP, λ=2"]
    if compare.pyplot("lambdas.png", "compare.json") is not None:
        assert (tmp_path / "lambdas.png").stat().st_size > 0
    compare.main(common + ["--lambdas", "0.5,1,2"])
    assert len(trained) == 4  # nothing trained again
    again = json.loads((tmp_path / "compare.json").read_text())
    assert again["summaries"] == first["summaries"] and again["lambdas"] == first["lambdas"]


@pytest.mark.slow
def test_only_a_finished_run_of_the_same_settings_is_reused(device, tmp_path, monkeypatch, capsys):
    """finished_run: a checkpoint at the last step, of the same settings but for the flags that change neither
    what is trained nor what is measured, with its final evaluation logged. The same invocation again trains
    nothing and gives the same summary. A partial run (its checkpoint at an earlier step), a run of other settings
    or one whose log lacks the final evaluation is trained again."""
    common = TINY + ["--device", device, "--seeds", "1", "--max-iters", "2", "--eval-interval", "2",
                     "--out-dir", str(tmp_path)]
    trained, real_train = [], train.train
    monkeypatch.setattr(train, "train", lambda run, **kw: trained.append(run.args.out_dir) or real_train(run, **kw))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no plots: a second faster, and not what this tests
    compare.main(common)
    first = json.loads((tmp_path / "compare.json").read_text())
    compare.main(common)
    assert len(trained) == 2 and json.loads((tmp_path / "compare.json").read_text())["summaries"] == first["summaries"]
    args = compare.parse_args(common)
    runs = compare.arms(args, 1337, compare.arm_changes(args))
    ntp = runs["NTP"]
    assert compare.finished_run(ntp)[0] is not None and compare.finished_run(ntp)[1] is None
    for flag, value in (("device", "cpu"), ("log_interval", 1), ("compile", True), ("deterministic", True)):
        assert compare.finished_run(argparse.Namespace(**{**vars(ntp), flag: value}))[0] is not None, flag
    other = compare.finished_run(argparse.Namespace(**{**vars(ntp), "learning_rate": 1e-3}))
    assert other == (None, "it was trained with --learning-rate 0.002, not 0.001")
    assert compare.finished_run(argparse.Namespace(**{**vars(ntp), "out_dir": str(tmp_path / "none")})) == (None, None)
    metrics = tmp_path / "seed1337-nitp" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:-1]))  # no final evaluation
    assert compare.finished_run(runs["NITP"]) == (None, "its metrics.jsonl lacks the final evaluation")
    ckpt_path = tmp_path / "seed1337-ntp" / "ckpt.pt"
    torch.save({**torch.load(ckpt_path, weights_only=True), "step": 1}, ckpt_path)  # as if stopped at step 1
    assert compare.finished_run(ntp) == (None, "it is at step 1, not 2")
    capsys.readouterr()
    compare.main(common)
    assert trained[2:] == [ntp.out_dir, runs["NITP"].out_dir]
    assert f"seed 1337: NTP: {ntp.out_dir} holds a checkpoint, but it is at step 1, not 2: trained again from the " \
           f"start" in capsys.readouterr().out
    assert compare.finished_run(ntp)[0]["step"] == 2 and compare.finished_run(runs["NITP"])[0] is not None


# ---------------------------------------------------------------------------------------------------- controls

def test_the_shuffled_target_is_a_permutation_of_the_true_targets_and_stops_gradients():
    """nitp.NITPConfig(shuffled=True), the control: the targets are the true z_{t+1}, traded among the (batch,
    position) pairs, detached as NITP's are; the predictions are unchanged. With shuffled=False (the default)
    nothing changes, bit for bit, and no random number is drawn."""
    g = torch.Generator().manual_seed(0)
    h, z = torch.randn(3, 12, 16, generator=g), torch.randn(3, 12, 16, generator=g, requires_grad=True)
    pred, target = tiny_nitp().pairs(h, z)
    plain = tiny_nitp(shuffled=False)  # the same weights (tiny_nitp seeds itself)
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    plain_pred, plain_target = plain.pairs(h, z)
    assert torch.equal(torch.rand(1), before)                                  # the default draws nothing
    assert torch.equal(pred, plain_pred) and torch.equal(target, plain_target)
    shuffled_pred, shuffled = tiny_nitp(shuffled=True).pairs(h, z)
    assert torch.equal(shuffled_pred, pred) and shuffled.shape == target.shape and not shuffled.requires_grad
    rows, true_rows = shuffled.flatten(0, 1).tolist(), target.flatten(0, 1).tolist()
    assert sorted(rows) == sorted(true_rows) and rows != true_rows             # the same targets, elsewhere
    parser_args = machinery.parse_args(["--nitp", "--nitp-shuffled-target"])
    assert train.nitp_config(parser_args).shuffled and not train.nitp_config(machinery.parse_args(["--nitp"])).shuffled


def test_the_mean_direction_baseline_is_1_for_one_direction_and_near_0_for_random_ones():
    """nitp_cos_mean_direction: the mean cosine of the targets with their mean direction. Targets all one way (of
    any length): 1. Random directions: near 0. diagnostics() logs it beside nitp_cos."""
    g = torch.Generator().manual_seed(0)
    one_way = torch.rand(4, 10, 1, generator=g) * torch.randn(1, 1, 32, generator=g).abs()
    assert mean_direction_cos(one_way + 0.0) == pytest.approx(1.0, abs=1e-6)
    assert abs(mean_direction_cos(torch.randn(64, 64, 32, generator=g))) < 0.05
    two_ways = torch.eye(32)[torch.arange(40) % 2].view(4, 10, 32)        # half along e0, half along e1
    assert mean_direction_cos(two_ways) == pytest.approx(2 ** -0.5)       # each at 45° to their mean direction
    model, head = tiny_model(), tiny_nitp()
    found = diagnostics(model, head, tokens(), tokens(seed=1), torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        out = model(tokens())
        _, target = head.pairs(out.hidden, out.block_outputs[head.layer])
    assert found["nitp_cos_mean_direction"] == pytest.approx(mean_direction_cos(target), abs=1e-6)
    assert -1 <= found["nitp_cos_mean_direction"] <= 1


# ---------------------------------------------------------------------------------------------------- the summary

def fake_final(seed: int, rng: np.random.Generator, resampled: bool = True) -> dict:
    """One seed's final records of NTP and NITP, made up: the metrics the summary reads, the probe scores and, with
    `resampled`, their scores on 50 resamples of the text (each target's NITP a little above NTP's)."""
    final = {}
    for run, lift in (("NTP", 0.0), ("NITP", 0.01)):
        record = {"seed": seed, "val_lm": 1.4 + rng.normal(0, 0.01) + lift / 2, "erank": 30 + rng.normal() + 100 * lift,
                  "anisotropy": 0.3 + rng.normal(0, 0.01) - lift, "ms_per_iter": 10.0}
        text = rng.normal(0, 0.01, size=50)
        record["probe_resampled"] = {name: (0.5 + lift + text + rng.normal(0, 0.002, size=50)).tolist()
                                     for name in probe.TARGETS}
        for name in probe.TARGETS:
            record[f"probe:{name}"] = float(np.mean(record["probe_resampled"][name]))
        record["probe_mean"] = float(np.mean([record[f"probe:{name}"] for name in probe.TARGETS]))
        if not resampled:
            del record["probe_resampled"]
        final[run] = record
    return final


def test_the_probe_interval_holds_the_texts_variance_and_the_targets_are_holm_corrected(capsys):
    """The probe score's interval: t · sqrt(std²/n + the variance over text resamples of the seed-mean difference);
    each target's p is Holm-corrected over the targets; without resamples (an older compare.json) the interval is
    the seeds' alone."""
    rng = np.random.default_rng(0)
    finals = [fake_final(seed, rng) for seed in (1, 2, 3, 4)]
    summary = compare.summarize(finals)
    seed_mean = np.mean([compare.resampled_probe(f["NITP"], None) - compare.resampled_probe(f["NTP"], None)
                         for f in finals], axis=0)
    delta = [f["NITP"]["probe_mean"] - f["NTP"]["probe_mean"] for f in finals]
    shared = np.var(seed_mean, ddof=1)
    assert summary["probe_mean"]["shared_var"] == pytest.approx(shared) and shared > 0
    assert summary["probe_mean"]["half_width"] == pytest.approx(
        stats.t_critical(3) * np.sqrt(np.var(delta, ddof=1) / 4 + shared))
    rows = summary["probes"]
    assert [row["holm_p"] for row in rows.values()] == pytest.approx(stats.holm([row["t_test_p"] for row in rows.values()]))
    assert all(row["shared_var"] > 0 for row in rows.values())
    printed = capsys.readouterr().out
    assert "probe targets, one by one (Holm's correction over the 11)" in printed and "the text's variance" in printed
    older = compare.summarize([fake_final(seed, rng, resampled=False) for seed in (1, 2, 3)])
    assert older["probe_mean"]["shared_var"] is None
    assert older["probe_mean"]["half_width"] == pytest.approx(stats.t_critical(2) * older["probe_mean"]["std"] / 3 ** 0.5)


@pytest.mark.slow
def test_a_nan_metric_gives_no_verdict_in_words_and_compare_json_is_written(device, tmp_path, monkeypatch, capsys):
    """A metric that comes out NaN for one run: the summary says which seed gave no verdict, the other metrics are
    summarized, and compare.json is written; and compare.json holds the runs even when the summary itself fails."""
    real_train = train.train

    def nan_rank(run, **kw):
        records = real_train(run, **kw)
        if run.nitp is not None:
            records[-1]["erank"] = float("nan")
        return records

    monkeypatch.setattr(train, "train", nan_rank)
    common = TINY + ["--device", device, "--seeds", "1", "--max-iters", "2", "--eval-interval", "2"]
    compare.main(common + ["--out-dir", str(tmp_path / "nan")])
    result = json.loads((tmp_path / "nan" / "compare.json").read_text())
    assert result["summary"]["erank"]["verdict"] == "no verdict: seed 1337's eff. rank (NITP − NTP) is nan"
    assert result["summary"]["val_lm"]["refused"] is None
    assert "eff. rank: –, NITP higher in 0 of 1 seeds: no verdict: seed 1337" in capsys.readouterr().out

    def failing(finals):
        raise RuntimeError("the summary failed")

    monkeypatch.setattr(compare, "summaries", failing)
    with pytest.raises(RuntimeError):
        compare.main(common + ["--out-dir", str(tmp_path / "failed")])
    assert json.loads((tmp_path / "failed" / "compare.json").read_text())["seeds"] == [1337]


def test_pooling_reads_older_compare_json_without_the_new_keys(tmp_path):
    """--pool over compare.json files with the probe resamples pools their text variance over all seeds; over a
    mix with an older file that lacks them (and lacks "seed" in its records), it pools the seeds' intervals alone."""
    rng = np.random.default_rng(1)
    settings = vars(compare.parse_args([]))

    def write(folder, seeds, resampled):
        finals = [fake_final(seed, rng, resampled) for seed in seeds]
        if not resampled:
            finals = [{run: {k: v for k, v in record.items() if k != "seed"} for run, record in f.items()}
                      for f in finals]
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "compare.json").write_text(json.dumps({"seeds": seeds, "finals": finals,
                                                                    "args": settings}))
        return finals

    new = write("a", [1, 2], True) + write("b", [3], True)
    write("old", [4, 5], False)
    pooled = compare.pool([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "p1"))
    assert pooled["summary"]["probe_mean"]["shared_var"] == pytest.approx(compare.text_variance(new, "NITP", "NTP"))
    mixed = compare.pool([str(tmp_path / "a"), str(tmp_path / "old")], str(tmp_path / "p2"))
    assert mixed["seeds"] == [1, 2, 4, 5] and mixed["summary"]["probe_mean"]["shared_var"] is None
    assert mixed["summary"]["probe_mean"]["ci"] is not None


def test_the_ablation_tables_cells_are_holm_corrected_per_table():
    """ablations.correct_cells: each table's cells (run − NTP; ablation − NITP) get Holm's correction over that
    table's cells alone, and a cell survives when its corrected p is below 5%."""
    def found(p):
        return {"t_test_p": p, "vs_nitp": {"t_test_p": None if p is None else p / 2}}

    table = {"NITP": {key: {"t_test_p": 0.001} for key, _, _ in ablations.COLUMNS},
             "ablation": {"val_lm": found(0.02), "erank": found(0.5), "anisotropy": found(None)}}
    ablations.correct_cells(table)
    corrected = [table[name][key]["holm_p"] for name in table for key, _, _ in ablations.COLUMNS]
    assert corrected[:5] == pytest.approx([0.005, 0.005, 0.005, 0.04, 0.5]) and corrected[5] is None  # 5 p-values
    assert [table["ablation"][key]["survives"] for key in ("val_lm", "erank", "anisotropy")] == [True, False, False]
    assert table["ablation"]["val_lm"]["vs_nitp"]["holm_p"] == pytest.approx(0.02)  # 2 p-values: 0.01 · 2
    assert not table["ablation"]["erank"]["vs_nitp"]["survives"] and table["NITP"]["erank"]["survives"]
    assert ablations.cell({**table["ablation"]["val_lm"], "mean": 0.1, "ci": [0.05, 0.15]}, "{:.2f}").endswith(" *")
