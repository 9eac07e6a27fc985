"""Intervals, p-values and the verdict against known values: scipy, hand-computed cases and
synthetic comparisons whose answer is known."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from scipy import stats

from finetune.compare.verdict import Candidate, judge
from finetune.stats import significance
from finetune.stats.metrics import EvaluationReport
from finetune.stats.significance import Bootstrap, holm, mcnemar_exact


def model(targets: np.ndarray, accuracy: float, seed: int) -> np.ndarray:
    """Predictions right on a random `accuracy` share of the images, else a wrong class."""
    rng = np.random.default_rng(seed)
    wrong = (targets + rng.integers(1, 4, targets.size)) % 4
    return np.where(rng.random(targets.size) < accuracy, targets, wrong)


TARGETS = np.random.default_rng(0).integers(0, 4, 400)


# -- McNemar and Holm ---------------------------------------------------------------------------
def test_mcnemar_hand_computed_case() -> None:
    # 9 images only a gets right, 1 only b: p = 2 (C(10,0) + C(10,1)) / 2^10.
    a = np.array([True] * 9 + [False] + [True] * 5 + [False] * 3)
    b = np.array([False] * 9 + [True] + [True] * 5 + [False] * 3)
    assert mcnemar_exact(a, b) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(a, a) == 1.0  # no discordant image


@pytest.mark.parametrize(("only_a", "only_b"), [(0, 7), (12, 5), (40, 25), (3, 3), (150, 120)])
def test_mcnemar_equals_scipy_binomtest(only_a: int, only_b: int) -> None:
    a = np.array([True] * only_a + [False] * only_b + [True] * 30 + [False] * 4)
    b = np.array([False] * only_a + [True] * only_b + [True] * 30 + [False] * 4)
    expected = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-12)


def test_holm_textbook_example() -> None:
    # sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 → kept monotone at 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []
    with pytest.raises(ValueError, match=r"p-values must lie in \[0, 1\]"):
        holm([0.2, 1.5])


# -- intervals ----------------------------------------------------------------------------------
def test_one_run_accuracy_interval_is_the_binomial_quantiles() -> None:
    # Resampling n images of which k are right draws Binomial(n, k/n) right ones.
    targets = np.zeros(200, dtype=int)
    predictions = np.r_[np.zeros(160, dtype=int), np.ones(40, dtype=int)]
    estimate = Bootstrap(targets=targets, num_classes=2, resamples=20000).accuracy(predictions)
    low, high = stats.binom.ppf([0.025, 0.975], 200, 0.8) / 200
    assert estimate.value == 0.8 and estimate.runs == 1
    assert estimate.low == pytest.approx(low, abs=1 / 200)
    assert estimate.high == pytest.approx(high, abs=1 / 200)


def test_runs_are_resampled_too() -> None:
    # Run 0 gets every image right, run 1 none: drawing 2 runs gives a mean of 1 or 0 (each
    # 1/4) or 0.5 (1/2) whatever the images, so the 95% interval is [0, 1] around 0.5.
    targets = np.zeros(50, dtype=int)
    runs = np.stack([np.zeros(50, dtype=int), np.ones(50, dtype=int)])
    estimate = Bootstrap(targets=targets, num_classes=2).accuracy(runs)
    assert (estimate.value, estimate.low, estimate.high, estimate.runs) == (0.5, 0.0, 1.0, 2)


def test_macro_f1_value_matches_metrics_and_interval_brackets_it() -> None:
    runs = np.stack([model(TARGETS, 0.7, seed) for seed in (1, 2)])
    estimate = Bootstrap(targets=TARGETS, num_classes=4).macro_f1(runs)
    expected = np.mean([EvaluationReport.from_predictions(TARGETS, r, 4).macro_f1 for r in runs])
    assert estimate.value == pytest.approx(expected, abs=1e-12)
    assert estimate.low < estimate.value < estimate.high < 1.0
    perfect = Bootstrap(targets=TARGETS).macro_f1(TARGETS)
    assert perfect.interval == [1.0, 1.0]


def test_reproducible_from_the_seed_and_chunking_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    predictions = model(TARGETS, 0.6, 3)
    whole = Bootstrap(targets=TARGETS, seed=5).accuracy(predictions)
    assert Bootstrap(targets=TARGETS, seed=5).accuracy(predictions) == whole
    assert Bootstrap(targets=TARGETS, seed=6).accuracy(predictions) != whole
    monkeypatch.setattr(significance, "_CHUNK_VALUES", TARGETS.size * 7)  # 7 draws a chunk
    assert Bootstrap(targets=TARGETS, seed=5).accuracy(predictions) == whole


# -- paired differences -------------------------------------------------------------------------
def test_clearly_better_model_is_significant_and_a_tie_is_not() -> None:
    strong = np.stack([model(TARGETS, 0.9, s) for s in range(3)])
    weak = np.stack([model(TARGETS, 0.6, s + 10) for s in range(3)])
    twin = np.stack([model(TARGETS, 0.9, s + 20) for s in range(2)])  # same skill, other runs
    bootstrap = Bootstrap(targets=TARGETS)
    gap = bootstrap.difference(strong, weak)
    assert gap.value == pytest.approx((strong == TARGETS).mean() - (weak == TARGETS).mean())
    assert 0 < gap.low < gap.value < gap.high and gap.p_value < 0.01
    same = bootstrap.difference(strong[0], strong[0])
    assert (same.value, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    reseeded = bootstrap.difference(strong, strong)  # runs drawn independently for each side
    assert reseeded.low < 0 < reseeded.high and reseeded.p_value > 0.2

    pairs = bootstrap.pairwise({"strong": strong, "weak": weak, "twin": twin})
    found = {(p.a, p.b): p for p in pairs}
    assert set(found) == {("strong", "weak"), ("strong", "twin"), ("weak", "twin")}
    assert found["strong", "weak"].significant and found["weak", "twin"].significant
    assert not found["strong", "twin"].significant
    adjusted = holm([p.difference.p_value for p in pairs])
    assert [p.p_adjusted for p in pairs] == adjusted
    row = found["strong", "twin"].to_dict()
    assert set(row) >= {"a", "b", "difference", "ci95", "p_value", "significant"}
    assert row["ci95"][0] < 0 < row["ci95"][1]


def test_pairing_narrows_the_interval() -> None:
    # b is a with 8 extra mistakes: unpaired, the noise of two 400-image accuracies would
    # swamp 2 points; paired, only the 8 images that differ vary.
    a = model(TARGETS, 0.7, 1)
    b = a.copy()
    flip = np.flatnonzero(a == TARGETS)[:8]
    b[flip] = (TARGETS[flip] + 1) % 4
    gap = Bootstrap(targets=TARGETS).difference(a, b)
    assert gap.value == pytest.approx(8 / 400) and gap.low > 0 and gap.p_value < 0.01
    alone = Bootstrap(targets=TARGETS).accuracy(a)
    assert gap.high - gap.low < (alone.high - alone.low) / 3


def test_bad_input_names_the_problem() -> None:
    with pytest.raises(ValueError, match="runs × 400 array"):
        Bootstrap(targets=TARGETS).accuracy(TARGETS[:10])
    with pytest.raises(ValueError, match=r"outside 0\.\.3; pass num_classes"):
        Bootstrap(targets=TARGETS).accuracy(TARGETS + 1)
    with pytest.raises(ValueError, match="num_classes=2 but a target is 3"):
        Bootstrap(targets=TARGETS, num_classes=2)
    with pytest.raises(ValueError, match=r"resamples must be an integer ≥ 100"):
        Bootstrap(targets=TARGETS, resamples=10)
    with pytest.raises(ValueError, match="level must lie strictly between 0 and 1"):
        Bootstrap(targets=TARGETS, level=95)
    with pytest.raises(ValueError, match="class indices"):
        Bootstrap(targets=["cat", "dog"])
    with pytest.raises(ValueError, match="pair up image by image"):
        mcnemar_exact([True, False], [True])


# -- the verdict --------------------------------------------------------------------------------
def candidates(runs: int = 3) -> list[Candidate]:
    return [Candidate(name="full-unfreeze", accuracy=0.885, trainable_share=1.0,
                      seconds_per_epoch=16.2, runs=runs),
            Candidate(name="last-layer", accuracy=0.883, trainable_share=0.008,
                      seconds_per_epoch=6.0, runs=runs),
            Candidate(name="from-scratch", accuracy=0.05, trainable_share=1.0,
                      seconds_per_epoch=16.0, runs=runs)]


def test_verdict_names_the_tied_and_their_cost() -> None:
    targets = TARGETS
    good = [model(targets, 0.88, s) for s in range(3)]
    predictions = {"full-unfreeze": np.stack(good), "last-layer": np.stack(
        [model(targets, 0.88, s + 5) for s in range(3)]),
        "from-scratch": np.stack([model(targets, 0.05, s + 9) for s in range(3)])}
    verdict = judge(candidates(), Bootstrap(targets=targets).pairwise(predictions))
    assert verdict.best == ("full-unfreeze", "last-layer")
    assert verdict.text == (
        "full-unfreeze and last-layer are tied within noise (paired bootstrap, 95%, "
        "Holm-corrected); last-layer trains 0.8% of the parameters and is 2.7× faster than "
        "full-unfreeze.")


def test_verdict_names_a_clear_winner_and_a_single_seed() -> None:
    predictions = {"full-unfreeze": model(TARGETS, 0.95, 1), "last-layer": model(TARGETS, 0.6, 2),
                   "from-scratch": model(TARGETS, 0.05, 3)}
    verdict = judge(candidates(runs=1), Bootstrap(targets=TARGETS).pairwise(predictions))
    assert verdict.best == ("full-unfreeze",)
    assert verdict.text.startswith("full-unfreeze is the most accurate, ahead of every other "
                                   "strategy beyond noise")
    assert "One run per strategy: only test-set noise is measured" in verdict.text
    mixed = [*candidates()[:2], attrs.evolve(candidates()[2], runs=1)]
    assert judge(mixed, Bootstrap(targets=TARGETS).pairwise(predictions)).text.endswith(
        " from-scratch ran once: its seed-to-seed noise is not measured.")
    alone = judge(candidates()[:1], [])
    assert alone.text == "Only full-unfreeze ran: nothing to compare it with."
