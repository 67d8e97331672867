"""Tests of the NTP vs NITP experiment (compare.py) and of the frozen-representation tasks (probe.py)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ablations
import compare
import evaluate
import flags
import probe
import train
from conftest import TINY, exact, read_metrics, same, tiny_model
from model import GPT
from nitp import NITP, NITPConfig

# ---------------------------------------------------------------------------------------------------- compare.py

def test_compare_starts_both_runs_from_the_same_weights_and_batches(device, tmp_path, monkeypatch, capsys):
    """--compare: the NTP and NITP runs begin with identical backbone weights and see identical batches."""
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
    monkeypatch.setattr(evaluate, "get_batch", recording_get_batch)
    train.main(TINY + ["--compare", "--device", device, "--seeds", "1", "--max-iters", "4", "--eval-interval", "2",
                       "--out-dir", str(tmp_path)])
    ntp, nitp = initial_weights
    assert ntp.keys() == nitp.keys() and all(torch.equal(ntp[k], nitp[k]) for k in ntp)
    assert len(batches[0]) == 2 + 4 and all(torch.equal(a, b) for a, b in zip(*batches))
    printed = capsys.readouterr().out
    assert "step 2" in printed and "delta" in printed


def test_compare_with_seeds_writes_its_summary(device, tmp_path, capsys):
    """--compare --seeds 2 finishes, writes both runs' metrics per seed and a summary with mean ± std of each
    delta and whether it beats the seed-to-seed spread."""
    train.main(TINY + ["--compare", "--device", device, "--seeds", "2", "--max-iters", "3", "--eval-interval", "3",
                       "--out-dir", str(tmp_path)])
    for run in ("seed1337-ntp", "seed1337-nitp", "seed1338-ntp", "seed1338-nitp"):
        assert any(r.get("eval") for r in read_metrics(tmp_path / run))
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["seeds"] == [1337, 1338]
    assert {"val_lm", "erank", "anisotropy", "ms_per_iter"} <= set(result["summary"])
    erank = result["summary"]["erank"]
    assert erank["delta_std"] is not None and isinstance(erank["larger_than_spread"], bool)
    assert erank["delta_mean"] == pytest.approx(np.mean(np.array(erank["arm"]) - np.array(erank["baseline"])))
    printed = capsys.readouterr().out
    assert "summary" in printed and "eff. rank: NITP higher in" in printed and "time:" in printed
    assert set(result["seconds"]) >= {"training steps", "evaluations", "probes"}
    # Only the comparison's own runs: no third, stray training run in OUT_DIR itself.
    made = {p.name for p in tmp_path.iterdir()}
    assert made - {"compare.png"} == {"seed1337-ntp", "seed1337-nitp", "seed1338-ntp", "seed1338-nitp", "compare.json"}


def test_the_summary_says_each_claim_in_plain_words():
    """A verdict names the direction and how many seeds agree, the size against the seed spread, and whether
    the paper's claim shows."""
    assert compare.verdict("eff. rank", "higher", [1.2, 1.3, 1.4], 1.3, 0.1, 0.26, "{:.2f}") == \
        "eff. rank: NITP higher in 3 of 3 seeds, +1.30 ± 0.10, 5.0× the seed spread: as the paper says"
    assert compare.verdict("anisotropy", "lower", [0.005, -0.003, -0.01], -0.003, 0.009, 0.009, "{:.4f}").endswith(
        "NITP lower in 2 of 3 seeds, -0.0030 ± 0.0090, within the seed spread (0.0090): not shown here")
    assert compare.verdict("val loss", "not worse", [0.01, 0.0, 0.02], 0.01, 0.01, 0.008, "{:.3f}").endswith(
        "1.2× the seed spread: NITP WORSE")
    assert compare.verdict("val loss", "not worse", [0.01, -0.02], -0.005, 0.02, 0.001, "{:.3f}").endswith(": NITP not worse")


def test_compare_runs_three_seeds_of_train_pys_own_defaults():
    """--compare is three seeds of the default run: the same model and schedule as `train.py --nitp`. Warm-up
    and evaluation follow --max-iters (a tenth each) unless given."""
    plain, compared = train.parse_args([]), train.parse_args(["--compare"])
    assert compared.seeds == 3
    # the pre-registered classroom setting (RESULTS.md, section 1)
    setting = {k: getattr(compared, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size",
                                                  "max_iters", "learning_rate", "warmup_iters", "data", "nitp_lambda")}
    assert setting == dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16, max_iters=1000,
                           learning_rate=2e-3, warmup_iters=100, data="python-docs", nitp_lambda=1.0)
    assert {k: v for k, v in vars(plain).items() if k != "compare"} == \
        {k: v for k, v in vars(compared).items() if k != "compare"}
    chosen = train.parse_args(["--max-iters=60", "--eval-interval", "7"])
    assert (chosen.warmup_iters, chosen.eval_interval) == (6, 7)
    assert train.parse_args(["--max-iters", "3"]).eval_interval == 1


# ---------------------------------------------------------------------------------------------------- probe.py

def test_linear_probe_is_near_chance_on_random_features_with_shuffled_labels():
    """Noise features and labels that mean nothing: test accuracy stays near 1/C."""
    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(800, 32, generator=g), dim=-1)
    labels = torch.randint(0, 4, (800,), generator=g)
    train_idx, test_idx = probe.split(labels)
    accuracy = probe.linear_probe_accuracy(features, labels, train_idx, test_idx)
    assert abs(accuracy - 0.25) < 0.08


def test_linear_probe_is_near_perfect_on_features_that_encode_the_label():
    """Features = the label's one-hot plus small noise: the probe finds it."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 8
    features = F.normalize(F.one_hot(labels, 32).float() + 0.05 * torch.randn(400, 32, generator=g), dim=-1)
    train_idx, test_idx = probe.split(labels)
    assert probe.linear_probe_accuracy(features, labels, train_idx, test_idx) > 0.98


def test_retrieval_scores_on_hand_made_similarities():
    """Recall@1 and MRR on matrices whose ranks are known: correct candidate first, second, third."""
    perfect = torch.eye(3)
    assert probe.retrieval_scores(perfect) == {"recall@1": 1.0, "mrr": 1.0}
    ranks_1_2_3 = torch.tensor([[0.9, 0.1, 0.2],
                                [0.8, 0.5, 0.1],   # query 1: its candidate is second
                                [0.7, 0.6, 0.3]])  # query 2: its candidate is third
    scores = probe.retrieval_scores(ranks_1_2_3)
    assert scores["recall@1"] == pytest.approx(1 / 3)
    assert scores["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_splits_are_deterministic_and_disjoint():
    """Every 4th passage of each section is a test passage: the same every time, never also a train passage."""
    labels = torch.tensor([0] * 9 + [1] * 5 + [2] * 8)
    train_a, test_a = probe.split(labels)
    train_b, test_b = probe.split(labels)
    assert torch.equal(train_a, train_b) and torch.equal(test_a, test_b)
    assert not set(train_a.tolist()) & set(test_a.tolist())
    assert sorted(train_a.tolist() + test_a.tolist()) == list(range(22))
    assert labels[test_a].tolist() == [0, 0, 1, 2, 2]


def test_pooling_ignores_positions_that_are_not_valid_tokens():
    """Padding positions do not change the pooled embedding, whatever their states hold."""
    states = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pooled = probe.mean_pool(states, mask)
    states[0, 3:] = 1e6
    assert torch.allclose(probe.mean_pool(states, mask), pooled)
    assert torch.allclose(pooled[0], F.normalize(states[0, :3].mean(dim=0), dim=0))
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(2))


def test_passages_pad_the_short_tail_and_drop_tiny_sections():
    """Sections are cut into fixed-length passages; the last one is padded and masked; short sections go."""
    sections = [("long", list(range(1, 8 * 10 + 4))), ("tiny", [1, 2, 3])]
    ids, mask, labels = probe.make_passages(sections, length=10)
    assert ids.shape == (9, 10) and labels.tolist() == [0] * 9
    assert mask[-1].tolist() == [True] * 3 + [False] * 7 and mask[:-1].all()


def test_probe_flag_scores_a_checkpoint_with_baselines(device, tmp_path, capsys):
    """`train.py --probe` reads the checkpoint in --out-dir, trains nothing, and reports the model, a random
    model of the same shape, bag-of-tokens and chance."""
    out = tmp_path / "run"
    train.main(TINY + ["--max-iters", "2", "--out-dir", str(out)])
    before = (out / "metrics.jsonl").read_text()
    train.main(["--probe", "--device", device, "--out-dir", str(out)])
    rows = json.loads((out / "probe.json").read_text())
    assert set(rows) == {"this model", "random init, same shape", "bag of tokens (its embeddings)", "chance"}
    assert all(0 <= rows[r][k] <= 1 for r in rows for k in ("probe_acc", "retrieval_recall@1", "retrieval_mrr"))
    assert (out / "metrics.jsonl").read_text() == before
    assert "probe acc" in capsys.readouterr().out


def test_probing_leaves_the_random_state_and_the_model_mode_as_they_were(device):
    """probe.report seeds its own probe and random baseline, but the caller's random state and the model's
    training mode come back unchanged: probing between two runs changes neither run."""
    model = tiny_model().to(device).train()
    sections = [(f"s{i}", [(i * t) % 50 for t in range(200)]) for i in range(3)]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probe.report({"m": model}, sections, 16, seed=0)
    assert torch.equal(torch.rand(3), expected) and model.training


def test_compare_with_compile_compiles_each_run_itself(device, tmp_path, monkeypatch):
    """With --compile, each run of --compare compiles its own model, and its ms/iter includes the compile time,
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
    train.main(TINY + ["--compare", "--compile", "--device", device, "--seeds", "1", "--max-iters", "2", "--eval-interval", "2",
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
        assert compare.t_test_p(deltas) == pytest.approx(0.05, abs=2e-4), df
    assert compare.t_test_p([0.1]) is None and compare.t_test_p([0.1, 0.1]) == 0.0
    assert compare.sign_test_p([1, 2, 3]) == 0.25 and compare.sign_test_p([1] * 5) == 0.0625
    assert compare.sign_test_p([1, 1, 1, 1, -1]) == 0.375 and compare.sign_test_p([1, -1]) == 1.0


def test_equal_compute_trains_ntp_for_nitps_flops_on_the_same_batches(device, tmp_path, capsys):
    """--equal-compute adds NTP trained for max_iters × (1 + NITP's analytic FLOP overhead) steps, its warm-up
    and evaluation interval stretched alike, from the same weights and on the same batches as the NTP run (its
    first max_iters batches are theirs). The summary and the plain words say both: at equal steps, at equal
    compute."""
    train.main(TINY + exact(device) + ["--compare", "--equal-compute", "--seeds", "1", "--max-iters", "20", "--eval-interval", "8",
                       "--out-dir", str(tmp_path)])
    result = json.loads((tmp_path / "compare.json").read_text())
    overhead = result["nitp_flop_overhead"]
    args = flags.parse_args(TINY)
    with torch.device("meta"):
        model = GPT(train.model_config(args, 256))
        head = NITP(NITPConfig(), args.n_layer, args.n_embd)
    assert overhead == pytest.approx(evaluate.flops_per_token(model, head) / evaluate.flops_per_token(model, None) - 1)
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
    """--ablations trains NTP, NITP and one run per ablation switch for each seed, and prints and saves the
    table of deltas against NTP with the paper's score beside each row."""
    train.main(TINY + ["--ablations", "--device", device, "--seeds", "2", "--max-iters", "2", "--out-dir", str(tmp_path)])
    table = json.loads((tmp_path / "ablations.json").read_text())["table"]
    assert list(table) == ["NITP", *ablations.ABLATIONS]
    assert all(len(row["erank"]["delta"]) == 2 and row["erank"]["t_test_p"] is not None for row in table.values())
    printed = capsys.readouterr().out
    assert "ablations: final evaluation" in printed and "18.23" in printed and "23.58" in printed
    args = json.loads((tmp_path / "seed1337-start-half-way" / "metrics.jsonl").read_text().splitlines()[1])
    assert args["step"] == 1 and "nitp" not in args  # NITP switched on at step 1 of 2, not before
    assert torch.load(tmp_path / "seed1338-no-head" / "ckpt.pt", weights_only=True)["args"]["nitp_head"] == "none"
