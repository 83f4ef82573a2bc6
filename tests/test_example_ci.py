"""Bootstrap CIs over test examples (the CI of a one-seed run): each metric's per-example
decomposition gives back exactly the metric module's value, and the intervals behave."""

from __future__ import annotations

import numpy as np
import pytest

from tuneval.problems import classification, extractive_qa, seq2seq
from tuneval.reporting import example_ci

RNG = np.random.default_rng(7)
REFS = RNG.integers(0, 3, 300).tolist()
CLS = {"label": REFS, "prediction": [r if RNG.random() < 0.7 else int(RNG.integers(0, 3)) for r in REFS]}
HYP = ["the cat sat on the mat. it purred.", "a dog runs fast", "hello world", "this is a test", "nothing"]
REF = ["the cat is on the mat. it slept.", "the dog runs quickly", "hello there world", "this is the test", "x y"]
S2S = {
    "prediction": HYP * 8,
    "reference": REF * 8,
    "nll": (RNG.random(40) * 20).tolist(),
    "target_tokens": RNG.integers(1, 9, 40).tolist(),
    "example_id": list(range(40)),
}
QA = {
    "prediction_text": ["Paris", "the Eiffel tower", "", "1889", "red"] * 6,
    "gold_answers": [["Paris"], ["Eiffel Tower", "tower"], ["Gustave"], ["1889"], ["blue"]] * 6,
    "score": [1.0] * 30,
}
CASES = [
    ("classification", ["accuracy", "f1", "precision", "recall"], CLS, {"label_names": ["a", "b", "c"]}),
    ("seq2seq", ["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "perplexity"], S2S, {}),
    ("extractive_qa", ["exact_match", "f1"], QA, {"postprocess": {"version_2_with_negative": False}}),
]
SCORERS = {"classification": classification.score, "seq2seq": seq2seq.score, "extractive_qa": extractive_qa.score}


@pytest.mark.parametrize(("problem", "names", "table", "info"), CASES, ids=[c[0] for c in CASES])
def test_decomposition_equals_metric_and_ci_brackets_it(problem, names, table, info) -> None:
    values, _ = SCORERS[problem](table, names, info)
    cis = example_ci.bootstrap_cis(problem, names, table, info, resamples=300)
    assert set(cis) == set(names)
    for name in names:
        assert example_ci.point_value(problem, name, table, info) == pytest.approx(values[name], rel=1e-9)
        assert cis[name]["ci_low"] < values[name] < cis[name]["ci_high"], name
    assert example_ci.bootstrap_cis(problem, names, table, info, resamples=300) == cis  # seeded


def test_hand_computed_two_examples() -> None:
    """Scores [0, 1]: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the
    2.5% and 97.5% quantiles are 0 and 1; all-correct gives the degenerate interval [1, 1]."""
    table = {"label": [0, 1], "prediction": [1, 1]}
    info = {"label_names": ["a", "b"]}
    assert example_ci.bootstrap_cis("classification", ["accuracy"], table, info) == {
        "accuracy": {"ci_low": 0.0, "ci_high": 1.0}
    }
    perfect = {"label": [0, 1, 1], "prediction": [0, 1, 1]}
    assert example_ci.bootstrap_cis("classification", ["accuracy"], perfect, info)["accuracy"] == {
        "ci_low": 1.0,
        "ci_high": 1.0,
    }
    assert example_ci.bootstrap_cis("classification", ["accuracy"], {"label": [0], "prediction": [0]}, info) == {}


def test_width_shrinks_like_one_over_sqrt_n() -> None:
    """Accuracy 0.8 on n and on 4n examples: the 95% interval is about half as wide (and near the
    normal approximation 2 * 1.96 * sqrt(p(1-p)/n))."""
    info = {"label_names": ["a", "b"]}
    widths = []
    for n in (250, 1000):
        table = {"label": [1] * n, "prediction": [1] * (4 * n // 5) + [0] * (n // 5)}
        ci = example_ci.bootstrap_cis("classification", ["accuracy"], table, info)["accuracy"]
        widths.append(ci["ci_high"] - ci["ci_low"])
        assert widths[-1] == pytest.approx(2 * 1.96 * (0.8 * 0.2 / n) ** 0.5, rel=0.15)
    assert widths[1] == pytest.approx(widths[0] / 2, rel=0.2)
