"""Frozen-state probes: what a trained model's hidden states hold, read by a linear map, on text it never saw.

`python probe.py --out-dir OUT_DIR` probes the model saved there; compare.py probes every final model it trains.

The paper's own test freezes each model and scores its mean-pooled last hidden states on 25 MTEB tasks. We cannot
download MTEB, and a toy byte-level model says more when it is asked, position by position, what its state holds
about the text around it. So a linear probe reads labels that the text itself gives, at every position t of
the validation split:

  the text at t, which needs the context of the line (the label counts only where the window holds the line's start):
    quote        inside a "double-quoted" span: an odd number of " in the line so far
    brackets     the depth of ( [ { in the line so far: 0, 1, 2 or more
    indent       the line's indentation: 0, 1-3, 4-7, 8 or more spaces (counted once the indentation has ended)
    column       the column, in bins of 8 bytes: 0-7, 8-15, ..., 56 and more
  memory         the byte at t-1, t-2, t-4, t-8 (where the window holds it)
  look-ahead     the byte at t+1, which NTP trains the LM head to read off h_t; at t+2 and t+3, the "Future Lens"
                 probe (Pal et al. 2023): NITP asks h_t for the model's own representation of position t+1, and
                 whether that brings more of the future into h_t is what these ask.

The probe is ridge regression onto one-hot labels, each class weighted by the inverse of its frequency so that a
rare class counts as much as a common one, fitted in closed form (no optimizer, no seed). The held-out documents
(data.py: topics of the reference that no training text repeats) take turns: the probe is fitted on the states of
every other document and scored on the rest, so it is scored on topics it was not fitted on either,
by balanced accuracy, the mean over classes of the share of that class's positions predicted right: chance is
1/K for K classes, whatever their frequencies. Classes too rare to fit or to score are left out.

A score measured on one sample of text has that sample's error, which more seeds do not shrink: every model is
scored on the same windows. So each score comes with RESAMPLES replicates: the balanced accuracy recomputed on
resamples of the scoring windows, drawn with replacement (the bootstrap, window by window since neighbouring
positions are alike). The resamples are seeded and depend only on the number of scoring windows, so they are the
same for every model, seed and invocation: two models' replicates pair, and compare.py takes the variance of the
seed-mean difference over them as the text's share of the interval (stats.paired's shared_var).

Each model is probed at its final hidden state (after ln_f: what the LM head reads, and what NITP trains) and at
every block's output ([0] the embeddings), for the depth picture. Three baselines say what the states add:
  - the input embeddings alone (block output 0): the byte at t and its position, no context;
  - the mean of the last 8 input embeddings: the recent bytes without their order;
  - the untrained network of the same shape: its final hidden states at initialization.
"""
import json
from pathlib import Path

import numpy as np
import torch

from model import GPT

TARGETS = ("quote", "brackets", "indent", "column", "byte t-1", "byte t-2", "byte t-4", "byte t-8",
           "byte t+1", "byte t+2", "byte t+3")
MIN_FIT, MIN_SCORE = 20, 5  # a class is probed when the fitting text has this many of it and the scoring text this many
RIDGE = 1e-3                # the ridge penalty, per class (each class weighs 1 in the fit)
RECENT = 8                  # the "recent embeddings" baseline averages this many
RESAMPLES, RESAMPLE_SEED = 1000, 0  # resamples of the scoring windows, the same for every model and seed


# ----------------------------------------------------------------------------------------------------
# Labels from the text: for each window of bytes, one label per position (-1 where the window cannot tell)

def labels(tokens: np.ndarray, starts: list[int], length: int) -> dict[str, np.ndarray]:
    """tokens: the byte ids of a text; windows of `length` bytes at `starts`. Returns {target: (W, length)}."""
    out = {name: np.full((len(starts), length), -1, dtype=np.int64) for name in TARGETS}
    for w, start in enumerate(starts):
        window = tokens[start:start + length].tolist()
        line_start = None  # where the current line began in the window; None until a newline is seen
        quotes = depth = indent = 0
        indenting = True
        for t, byte in enumerate(window):
            if line_start is not None:
                if indenting and byte != ord(" "):
                    indenting, indent = False, t - line_start
                quotes += byte == ord('"')
                depth = max(0, depth + (byte in b"([{") - (byte in b")]}"))
                out["quote"][w, t] = quotes % 2
                out["brackets"][w, t] = min(depth, 2)
                out["column"][w, t] = min((t - line_start) // 8, 7)
                if not indenting:
                    out["indent"][w, t] = 0 if indent == 0 else 1 if indent <= 3 else 2 if indent <= 7 else 3
            for k in (1, 2, 4, 8):
                if t >= k:
                    out[f"byte t-{k}"][w, t] = window[t - k]
            for k in (1, 2, 3):
                if start + t + k < len(tokens):
                    out[f"byte t+{k}"][w, t] = tokens[start + t + k]
            if byte == ord("\n"):  # the next position starts a line the window holds
                line_start, quotes, depth, indenting = t + 1, 0, 0, True
    return out


# ----------------------------------------------------------------------------------------------------
# The probe

def balanced_accuracy(predicted: np.ndarray, truth: np.ndarray, n_classes: int) -> float:
    """The mean over the classes of the share of each class's positions predicted right."""
    return float(np.mean([(predicted[truth == k] == k).mean() for k in range(n_classes)]))


def kept_classes(fit_y: np.ndarray, score_y: np.ndarray) -> np.ndarray:
    """The labels with at least MIN_FIT positions in the fitting half and MIN_SCORE in the scoring half (-1: none)."""
    fit_counts, score_counts = (np.bincount(y[y >= 0], minlength=256)[:256] for y in (fit_y, score_y))
    return np.flatnonzero((fit_counts >= MIN_FIT) & (score_counts >= MIN_SCORE))


def design(fit: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, d) states of the fitting and the scoring positions -> the probe's inputs (M, d + 1): each feature
    standardized by the fitting positions' mean and std, and a constant column (the probe's bias)."""
    mean, std = fit.mean(dim=0), fit.std(dim=0).clamp(min=1e-8)
    return tuple(torch.cat([(x.float() - mean) / std, torch.ones(len(x), 1)], dim=1) for x in (fit, score))


def fit_and_predict(fit_a: torch.Tensor, fit_y: np.ndarray, score_a: torch.Tensor,
                    score_y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, np.ndarray] | None:
    """A linear probe fitted on (fit_a, fit_y), design()'s inputs and their labels, and applied to score_a. Labels
    -1 and the classes too rare in either half are left out; None if fewer than two are kept. Returns, on the
    scoring positions it keeps, the predicted class and the true one (0..K-1 each), K, and which positions of
    score_y it kept (a bool mask)."""
    classes = kept_classes(fit_y, score_y)
    if len(classes) < 2:
        return None
    index = np.full(256, -1)
    index[classes] = np.arange(len(classes))  # label -> class number 0..K-1
    fit_keep, score_keep = np.isin(fit_y, classes), np.isin(score_y, classes)
    a, y = fit_a[torch.from_numpy(fit_keep)], torch.from_numpy(index[fit_y[fit_keep]])   # (M, d + 1), (M,)
    counts = torch.bincount(y, minlength=len(classes)).float()                          # (K,)
    weighted = a / counts[y][:, None]                     # each class weighs 1 in all, however common it is
    targets = torch.nn.functional.one_hot(y, len(classes)).float()                      # (M, K)
    gram = (a.T @ weighted).double() + RIDGE * len(classes) * torch.eye(a.size(1), dtype=torch.float64)
    coefficients = torch.linalg.solve(gram, (weighted.T @ targets).double()).float()    # (d + 1, K)
    predicted = (score_a[torch.from_numpy(score_keep)] @ coefficients).argmax(dim=1).numpy()
    return predicted, index[score_y[score_keep]], len(classes), score_keep


def probe(fit_a: torch.Tensor, fit_y: np.ndarray, score_a: torch.Tensor, score_y: np.ndarray) -> float | None:
    """The balanced accuracy of fit_and_predict()'s probe on the scoring positions; None if it has no probe."""
    result = fit_and_predict(fit_a, fit_y, score_a, score_y)
    return None if result is None else balanced_accuracy(*result[:3])


def resample_counts(n_windows: int, resamples: int = RESAMPLES, seed: int = RESAMPLE_SEED) -> np.ndarray:
    """(resamples, n_windows): how often each scoring window is drawn in each bootstrap resample of the windows.
    Seeded, and a function of n_windows alone: the same resamples for every model, seed and invocation."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_windows, np.full(n_windows, 1 / n_windows), size=resamples)


def resampled_scores(predicted: np.ndarray, truth: np.ndarray, n_classes: int, window: np.ndarray,
                     counts: np.ndarray) -> np.ndarray:
    """(resamples,): the balanced accuracy on each resample of the scoring windows. predicted, truth, window: one
    entry per scoring position (window: the index of its window); counts: resample_counts()'s matrix."""
    right, total = (np.zeros((counts.shape[1], n_classes)) for _ in range(2))  # (windows, K) each
    np.add.at(total, (window, truth), 1)
    np.add.at(right, (window, truth), predicted == truth)
    right, total = counts @ right, counts @ total                              # (resamples, K) each
    with np.errstate(invalid="ignore", divide="ignore"):  # a class that a resample does not draw: left out there
        return np.nanmean(right / total, axis=1)


# ----------------------------------------------------------------------------------------------------
# States of a model, and the probes on them

@torch.no_grad()
def states(model: GPT, windows: torch.Tensor, batch_size: int = 64) -> list[torch.Tensor]:
    """Every block's output ([0] the embeddings) and the final hidden state, each (W, T, d) in fp32 on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for i in range(0, len(windows), batch_size):
        out = model(windows[i:i + batch_size].to(device))
        parts.append([z.to("cpu", torch.float32) for z in (*out.block_outputs, out.hidden)])
    model.train(was_training)
    return [torch.cat(layer) for layer in zip(*parts)]


def recent_mean(embeddings: torch.Tensor, n: int = RECENT) -> torch.Tensor:
    """(W, T, d) -> (W, T, d): at each t, the mean of the embeddings at t-n+1 .. t that the window holds."""
    summed = embeddings.cumsum(dim=1)
    before = torch.cat([torch.zeros_like(summed[:, :n]), summed[:, :-n]], dim=1)[:, :summed.size(1)]
    counts = torch.arange(1, embeddings.size(1) + 1).clamp(max=n).view(1, -1, 1)
    return (summed - before) / counts


class Probes:
    """The probe positions of one validation split, and the probes of any model's states on them."""

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, length: int):
        """tokens: the held-out text, its documents one after another, starting at doc_starts. The documents take
        turns: the probes are fitted on the 1st, 3rd, 5th, ... and scored on the others, so that no text is in
        both, each cut into non-overlapping windows of `length`."""
        ends = [*doc_starts[1:], len(tokens)]
        parts = [np.concatenate([tokens[a:b] for a, b in list(zip(doc_starts, ends))[turn::2]] or [tokens[:0]])
                 for turn in (0, 1)]                                # the fitting text, the scoring text
        text = np.concatenate(parts)
        starts = [[offset + s for s in range(0, len(part) - length + 1, length)]
                  for offset, part in zip((0, len(parts[0])), parts)]  # windows inside each part, never across
        self.windows = torch.from_numpy(np.stack([text[s:s + length] for s in sum(starts, [])]).astype(np.int64))
        self.fit = torch.arange(len(self.windows)) < len(starts[0])  # (W,) True: a fitting window
        self.labels = labels(text, sum(starts, []), length)
        self.resamples = resample_counts(int((~self.fit).sum()))  # (RESAMPLES, scoring windows)

    def predictions(self, layer: torch.Tensor) -> dict[str, tuple | None]:
        """fit_and_predict() of each target's probe on these states (W, T, d)."""
        fit, score = design(layer[self.fit].flatten(0, 1), layer[~self.fit].flatten(0, 1))  # (positions, d + 1)
        return {name: fit_and_predict(fit, y[self.fit.numpy()].ravel(), score, y[~self.fit.numpy()].ravel())
                for name, y in self.labels.items()}

    def score(self, layer: torch.Tensor) -> dict[str, float | None]:
        """The balanced accuracy of each target's probe on these states (W, T, d)."""
        return {name: None if p is None else balanced_accuracy(*p[:3]) for name, p in self.predictions(layer).items()}

    def score_with_resamples(self, layer: torch.Tensor) -> tuple[dict[str, float | None], dict[str, list | None]]:
        """score(), and each target's balanced accuracy on every resample of the scoring windows."""
        scores, resampled = {}, {}
        window_of = np.repeat(np.arange(self.resamples.shape[1]), self.windows.size(1))  # scoring position -> window
        for name, p in self.predictions(layer).items():
            if p is None:
                scores[name] = resampled[name] = None
                continue
            predicted, truth, n_classes, kept = p
            scores[name] = balanced_accuracy(predicted, truth, n_classes)
            resampled[name] = np.round(resampled_scores(predicted, truth, n_classes, window_of[kept],
                                                        self.resamples), 6).tolist()
        return scores, resampled

    def of_model(self, model: GPT, depth: bool = True) -> dict:
        """The final hidden state's scores ("probe"), their mean over the targets ("probe_mean") and each target's
        scores on the resamples of the text ("probe_resampled"); with depth, also every block output's scores
        ("probe_by_layer": per target, the embeddings first, the final state last), at about five times the cost."""
        layers = states(model, self.windows)
        final, resampled = self.score_with_resamples(layers[-1])
        by_layer = [self.score(layer) for layer in layers[:-1]] + [final] if depth else [final]
        scores = {"probe_mean": mean_score(final), "probe": final, "probe_resampled": resampled}
        if depth:
            scores["probe_by_layer"] = {name: [layer[name] for layer in by_layer] for name in TARGETS}
        return scores

    def baselines(self, model: GPT, seed: int) -> dict[str, dict]:
        """The input embeddings of `model` alone, and their recent mean; the untrained network of its shape."""
        embeddings = states(model, self.windows)[0]
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's random state
            torch.manual_seed(seed)
            untrained = GPT(model.config).to(next(model.parameters()).device)
        rows = {"input embeddings alone": self.score(embeddings),
                f"mean of the last {RECENT} input embeddings": self.score(recent_mean(embeddings)),
                "untrained network, same shape": self.score(states(untrained, self.windows)[-1])}
        return {name: {"probe_mean": mean_score(scores), "probe": scores} for name, scores in rows.items()}


def mean_score(scores: dict[str, float | None]) -> float:
    """The mean balanced accuracy over the targets that could be probed."""
    return float(np.mean([v for v in scores.values() if v is not None]))


def chance(probes: Probes) -> dict[str, float | None]:
    """What guessing scores in balanced accuracy: 1/K for the K classes that each target's probe keeps."""
    fit, score = probes.fit.numpy(), ~probes.fit.numpy()
    sizes = {name: len(kept_classes(y[fit].ravel(), y[score].ravel())) for name, y in probes.labels.items()}
    return {name: 1 / k if k >= 2 else None for name, k in sizes.items()}


def print_table(rows: dict[str, dict], chances: dict[str, float | None]) -> None:
    """One line per model: the balanced accuracy of each target's probe on its final states, and their mean."""
    short = [name.replace("byte ", "") for name in TARGETS]
    print("frozen-state probes, balanced accuracy on held-out text (final hidden state):")
    print(f"  {'':34s} {'mean':>6s} " + " ".join(f"{name:>8s}" for name in short))
    for name, row in [*rows.items(), ("chance", {"probe": chances, "probe_mean": mean_score(chances)})]:
        cells = " ".join(f"{'–' if row['probe'][t] is None else format(row['probe'][t], '.3f'):>8s}" for t in TARGETS)
        print(f"  {name:34s} {row['probe_mean']:6.3f} {cells}")


# ----------------------------------------------------------------------------------------------------
# python probe.py --out-dir OUT_DIR

def main(argv: list[str] | None = None) -> None:
    import machinery  # what the command needs, not the module: compare.py imports this file for Probes alone
    import train
    from data import get_tokenizer, load_dataset

    parser = machinery.OneLineParser(prog="probe.py",
                                     description="Probe the frozen states of the model trained in --out-dir.")
    parser.add_argument("--out-dir", default="out", help="the run folder whose ckpt.pt to probe")
    parser.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu), or a torch device name")
    args = parser.parse_args(argv)
    try:
        machinery.check_out_dir(args.out_dir)
        saved = machinery.load(args.out_dir)
        settings = machinery.parse_args([], saved=saved["args"])  # the run's own flags, as --resume reads them
        device = machinery.pick_device(args.device)
        dataset = load_dataset(settings.data, get_tokenizer(settings.tokenizer), settings.block_size)
        if dataset.tokenizer.n_vocab != 256:
            raise ValueError("the probes read bytes: probe a model trained with --tokenizer bytes")
        model = GPT(train.model_config(settings, dataset.vocab_size))
        model.load_state_dict(saved["model"])
    except (ValueError, RuntimeError) as e:
        machinery.fail(str(e).splitlines()[0] if isinstance(e, ValueError) else
                       f"the checkpoint in {args.out_dir} does not fit the model its flags describe; train one "
                       f"with train.py", program="probe.py")
    model.to(device)
    probes = Probes(np.asarray(dataset.val), dataset.val_starts, settings.block_size)
    rows = {"this model": probes.of_model(model), **probes.baselines(model, settings.seed)}
    print_table(rows, chance(probes))
    (Path(args.out_dir) / "probe.json").write_text(json.dumps({**rows, "chance": chance(probes)}, indent=1))
    print(f"probes: {Path(args.out_dir) / 'probe.json'}")


if __name__ == "__main__":
    import machinery
    machinery.printable_output()  # before anything prints: a console that cannot hold a character must not crash
    main()
