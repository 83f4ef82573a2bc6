"""The training loop's parts: batching, padding, schedule, accumulation, determinism."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tuneval.config.train import TrainSettings
from tuneval.data.batching import PAD_LABEL, length_grouped_batches, make_collate, sorted_batches
from tuneval.models import loading
from tuneval.problems import classification as clf
from tuneval.training.loop import train
from tuneval.training.optim import build_optimizer, linear_schedule


def test_length_grouped_batches_cover_every_index_once_and_are_seeded() -> None:
    lengths = [(i * 7) % 23 + 1 for i in range(100)]
    a = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(3), mega=4)
    b = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(3), mega=4)
    c = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(4), mega=4)
    assert a == b and a != c
    assert sorted(i for batch in a for i in batch) == list(range(100))
    # Grouping keeps lengths inside a batch close: less padding than random batches.
    pad = sum(max(lengths[i] for i in bt) * len(bt) - sum(lengths[i] for i in bt) for bt in a)
    rand = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(3), group=False)
    pad_rand = sum(max(lengths[i] for i in bt) * len(bt) - sum(lengths[i] for i in bt) for bt in rand)
    assert pad < pad_rand / 2


def test_sorted_batches_longest_first() -> None:
    batches = sorted_batches([3, 9, 1, 5], 2)
    assert batches == [[1, 3], [0, 2]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_pads_ids_masks_and_labels(side: str) -> None:
    rows = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1, "example_id": "a"},
        {"input_ids": [8], "attention_mask": [1], "labels": 0, "example_id": "b"},
    ]
    out = make_collate(pad_id=0, padding_side=side, multiple_of=4)(rows)
    assert out["input_ids"].shape == (2, 4) and "example_id" not in out
    short = [0, 0, 0, 8] if side == "left" else [8, 0, 0, 0]
    assert out["input_ids"][1].tolist() == short
    assert out["attention_mask"][1].tolist() == [int(x != 0) for x in short]
    assert out["labels"].tolist() == [1, 0]
    seq = make_collate(0, side)([{"input_ids": [1, 2], "labels": [3, 4]}, {"input_ids": [1], "labels": [3]}])
    assert PAD_LABEL in seq["labels"][1].tolist()


def test_schedule_warms_up_then_decays_to_zero() -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, warmup=4, total=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert lrs[-1] == pytest.approx(1 / 6) and sched.get_last_lr()[0] == 0.0


def test_no_weight_decay_on_biases_and_norms(model_dir: Path) -> None:
    model = _model(model_dir)
    opt = build_optimizer(model, TrainSettings(weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    named = dict(model.named_parameters())
    assert id(named["classifier.weight"]) in decayed and id(named["classifier.bias"]) not in decayed
    assert not any(id(p) in decayed for n, p in named.items() if "LayerNorm" in n)


def _model(model_dir: Path) -> clf.Classifier:
    tok = loading.load_tokenizer(str(model_dir / "bert"))
    spec = SimpleNamespace(revision=None, trust_remote_code=False, pooling="auto")
    torch.manual_seed(0)
    model = clf.new_classifier(str(model_dir / "bert"), spec, tok, 2, dropout=0.0)
    for m in model.modules():  # no dropout: the comparison below must not depend on mask draws
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _toy_dataset(model_dir: Path):
    import tiny
    from datasets import Dataset

    tok = loading.load_tokenizer(str(model_dir / "bert"))
    rows = tiny.sentiment_rows(32, 5)
    bench = SimpleNamespace(columns=SimpleNamespace(text="text", text_pair=None, label="label", id=None), max_length=32)
    info = {"label_names": ["negative", "positive"]}
    return clf.prepare_split(Dataset.from_list(rows), tok, bench, info), tok


def test_gradient_accumulation_matches_the_big_batch(model_dir: Path) -> None:
    ds, tok = _toy_dataset(model_dir)
    common = dict(epochs=1, learning_rate=1e-3, warmup_steps=0, group_by_length=False, log_every_steps=1)
    big, acc = _model(model_dir), _model(model_dir)
    train(
        big,
        ds,
        TrainSettings(batch_size=16, **common),
        0,
        clf.loss_fn,
        None,
        tok.pad_token_id,
        "right",
        torch.device("cpu"),
        progress=False,
    )
    train(
        acc,
        ds,
        TrainSettings(batch_size=8, gradient_accumulation_steps=2, **common),
        0,
        clf.loss_fn,
        None,
        tok.pad_token_id,
        "right",
        torch.device("cpu"),
        progress=False,
    )
    for (name, p), q in zip(big.named_parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)


def test_same_seed_same_result_other_seed_differs(model_dir: Path) -> None:
    ds, tok = _toy_dataset(model_dir)
    s = TrainSettings(epochs=1, batch_size=8, learning_rate=1e-3, warmup_steps=0, log_every_steps=1)

    def run(seed: int) -> list[float]:
        result = train(
            _model(model_dir),
            ds,
            s,
            seed,
            clf.loss_fn,
            None,
            tok.pad_token_id,
            "right",
            torch.device("cpu"),
            progress=False,
        )
        return [h["loss"] for h in result.history]

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.integration
def test_compiled_training_follows_the_eager_loss_curve(model_dir: Path) -> None:
    # torch.compile(dynamic=True) fuses kernels, which reorders float sums: equal within fp32 noise,
    # over several distinct padded lengths (length-bucketed batches), not bit for bit. Dropout is off:
    # compiled dropout draws its masks with rand_like, not eager's bernoulli (README, Speed).
    ds, tok = _toy_dataset(model_dir)
    common = dict(epochs=1, batch_size=8, learning_rate=1e-3, warmup_steps=0, log_every_steps=1)
    eager, compiled = _model(model_dir), _model(model_dir)
    cpu = torch.device("cpu")
    ref = train(eager, ds, TrainSettings(**common), 3, clf.loss_fn, None, tok.pad_token_id, "right", cpu, None, False)
    got = train(
        compiled,
        ds,
        TrainSettings(compile=True, **common),
        3,
        clf.loss_fn,
        None,
        tok.pad_token_id,
        "right",
        cpu,
        None,
        False,
    )
    assert len(got.history) == len(ref.history) >= 4
    torch.testing.assert_close([h["loss"] for h in got.history], [h["loss"] for h in ref.history], atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)
    assert not any(k.startswith("_orig_mod") for k in compiled.state_dict())  # saved as the plain model


def test_tuneval_loop_follows_a_plain_pytorch_loop(model_dir: Path) -> None:
    # The reference: the textbook loop (per-tensor AdamW, padded batches in the same order, loss
    # read every step). tuneval's (fused AdamW, loss summed on device, read every N steps,
    # set_to_none) must give the same curve and weights within fp32 noise, dropout on.
    from tuneval.data.batching import iterate

    ds, tok = _toy_dataset(model_dir)
    s = TrainSettings(
        epochs=2, batch_size=8, learning_rate=1e-3, warmup_steps=2, weight_decay=0.01, log_every_steps=1, dropout=0.1
    )

    def fresh() -> clf.Classifier:
        model = _model(model_dir)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.1
        return model

    torch.manual_seed(5)
    ours = fresh()
    torch.manual_seed(123)  # the dropout stream both loops start from
    got = train(ours, ds, s, 9, clf.loss_fn, None, tok.pad_token_id, "right", torch.device("cpu"), None, False)

    torch.manual_seed(5)
    plain = fresh()
    torch.manual_seed(123)
    decay = [p for n, p in plain.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
    rest = [p for n, p in plain.named_parameters() if not (p.ndim >= 2 and "norm" not in n.lower())]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    total = 2 * -(-len(ds) // 8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: t / 2 if t < 2 else max(0.0, (total - t) / (total - 2)))
    gen = torch.Generator().manual_seed(9)
    lengths = [len(x) for x in ds["input_ids"]]
    losses = []
    plain.train()
    for _ in range(2):
        order = length_grouped_batches(lengths, 8, gen, shuffle=True, group=True)
        for _idx, batch in iterate(ds, order, make_collate(tok.pad_token_id, "right")):
            loss = clf.loss_fn(plain, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.item())

    torch.testing.assert_close([h["loss"] for h in got.history], losses, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(ours.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)
