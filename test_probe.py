"""Tests of the frozen-state probes (probe.py): the labels, the probe, its resamples of the text, the command."""
import json

import numpy as np
import pytest
import torch

import data
import probe
import train
from conftest import TINY
from model import GPT, GPTConfig


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
    probes = probe.Probes(tokens, np.array([0, len(tokens) // 2]), 16)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probes.of_model(model)
    probes.baselines(model, seed=0)
    assert torch.equal(torch.rand(3), expected) and model.training


def test_the_resamples_measure_the_texts_share_of_a_planted_difference():
    """Two fake models on 200 scoring windows of 10 positions, 5 of each of two classes: one right everywhere,
    one wrong on every position of a known 30% of the windows. Its score is 0.7; over the resamples of the windows
    the difference has the bootstrap's variance f(1 − f)/W, and the resamples are the same on every call."""
    n_windows, length, f = 200, 10, 0.3
    truth = np.tile(np.arange(length) % 2, n_windows)                          # (positions,)
    window = np.repeat(np.arange(n_windows), length)
    wrong = np.isin(window, np.arange(int(f * n_windows)))                      # the first 30% of the windows
    counts = probe.resample_counts(n_windows)
    assert counts.shape == (probe.RESAMPLES, n_windows) and (counts.sum(axis=1) == n_windows).all()
    assert np.array_equal(counts, probe.resample_counts(n_windows))            # seeded: the same every time
    right = probe.resampled_scores(truth, truth, 2, window, counts)
    worse = probe.resampled_scores(np.where(wrong, 1 - truth, truth), truth, 2, window, counts)
    assert probe.balanced_accuracy(np.where(wrong, 1 - truth, truth), truth, 2) == pytest.approx(1 - f)
    assert (right == 1).all() and worse.mean() == pytest.approx(1 - f, abs=0.005)
    assert np.var(right - worse, ddof=1) == pytest.approx(f * (1 - f) / n_windows, rel=0.15)


def test_a_models_resampled_scores_surround_its_score(device):
    """Probes.of_model gives each target's score on every resample of the scoring windows: RESAMPLES of them, in
    [0, 1], centred on the score; the same targets are missing in both."""
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=16)).to(device)
    tokens = np.frombuffer(b"some text,\n  with (lines) and \"quotes\"\n" * 40, dtype=np.uint8)
    scores = probe.Probes(tokens, np.array([0, len(tokens) // 2]), 16).of_model(model, depth=False)
    for name in probe.TARGETS:
        score, resampled = scores["probe"][name], scores["probe_resampled"][name]
        assert (score is None) == (resampled is None), name
        if score is not None:
            assert len(resampled) == probe.RESAMPLES and all(0 <= r <= 1 for r in resampled)
            assert np.mean(resampled) == pytest.approx(score, abs=0.05), name


def test_the_probes_fit_and_score_on_different_documents():
    """The held-out documents take turns: windows of the 1st and 3rd fit, of the 2nd and 4th score; no window holds
    text of both, and what is too short for a window is left out."""
    docs = [np.full(n, value, dtype=np.uint8) for n, value in ((40, 1), (35, 2), (20, 3), (16, 4))]
    probes = probe.Probes(np.concatenate(docs), np.cumsum([0] + [len(d) for d in docs[:-1]]), 16)
    fit, score = probes.windows[probes.fit], probes.windows[~probes.fit]
    assert set(fit.unique().tolist()) == {1, 3} and set(score.unique().tolist()) == {2, 4}
    assert (len(fit), len(score)) == ((40 + 20) // 16, (35 + 16) // 16)


def test_on_the_default_split_no_passage_is_both_fitted_and_scored():
    """On the Python reference's held-out topics, no 64-byte passage of a scoring window occurs in the fitting
    windows (a repeated topic, such as the second "if" statement, was cut from the held-out text)."""
    dataset = data.load_dataset("python-docs", data.get_tokenizer("bytes"), 64)
    probes = probe.Probes(np.asarray(dataset.val), dataset.val_starts, 64)
    fitted = b"|".join(bytes(w.numpy().astype(np.uint8)) for w in probes.windows[probes.fit])
    scored = [bytes(w.numpy().astype(np.uint8)) for w in probes.windows[~probes.fit]]
    assert probes.fit.sum() > 300 and len(scored) > 300
    assert not any(window in fitted for window in scored)
