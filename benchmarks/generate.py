"""Generation speed: tuneval's predict stage against a naive per-batch ``generate`` loop.

    python benchmarks/generate.py                         # CPU: XSum test inputs, MiniLM BERT2BERT
    python benchmarks/generate.py --rows 512 --device cuda

Same model, same inputs, same greedy settings. The naive loop walks the test set in its own
order in batches of ``--naive-batch`` (what a hand-written eval script does); tuneval sorts the
inputs by length and generates ``--batch`` rows per call (``decoding.generate_texts``). Prints
samples/s for both, the ratio, and how many outputs agree (greedy decoding is deterministic; a
different padding width may flip a near-tie argmax in a handful of rows). Speed is measured
here, never asserted in a unit test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="s2s-demo-xsum", help="a seq2seq pipeline of pipelines.yaml")
    p.add_argument("--rows", type=int, default=128, help="test inputs to generate for")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--naive-batch", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

    import torch

    from tuneval import problems
    from tuneval.config import load_config, resolve_runs
    from tuneval.inference.decoding import generate_texts, generation_kwargs, pad_batch
    from tuneval.models import loading
    from tuneval.pipeline import stages
    from tuneval.settings import Settings
    from tuneval.training.device import resolve_device

    loaded = load_config(ROOT / "pipelines.yaml")
    [run] = resolve_runs(loaded, [args.pipeline])[:1]
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TUNEVAL_CACHE_DIR"] = cache
        settings = Settings.from_env(loaded.root, track=False)
        prepared = stages.prepare(run, settings, stages.load(run, settings).ref).ref
        from tuneval.data.splits import open_split

        ds = open_split(prepared.path, "test")
        ds = ds.select(range(min(args.rows, len(ds))))
        info = prepared.meta()["info"]
        tokenizer = loading.load_tokenizer(run.model_path)
        torch.manual_seed(0)
        model = problems.get("seq2seq").build_model(run, tokenizer, info)
    device = resolve_device(args.device)
    model.eval().to(device)
    gen = {"num_beams": 1, "max_new_tokens": args.max_new_tokens, "no_repeat_ngram_size": 0, "length_penalty": 1.0}

    def naive() -> list[str]:
        cfg = model.generation_config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else tokenizer.pad_token_id
        kw = generation_kwargs(gen, pad, cfg.eos_token_id)
        out: list[str] = []
        rows = ds["input_ids"]
        with torch.inference_mode():
            for start in range(0, len(rows), args.naive_batch):
                ids, mask = pad_batch(rows[start : start + args.naive_batch], pad, "right")
                seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
                out += [t.strip() for t in tokenizer.batch_decode(seqs, skip_special_tokens=True)]
        return out

    def tuned() -> list[str]:
        return generate_texts(model, tokenizer, ds, {**gen, "batch_size": args.batch}, device)

    timings = {}
    outputs = {}
    for name, fn in (("naive", naive), ("tuneval", tuned), ("naive", naive), ("tuneval", tuned)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs[name] = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.setdefault(name, []).append(time.perf_counter() - start)
    best = {k: min(v) for k, v in timings.items()}  # best of two: the first pass also warms caches
    agree = sum(a == b for a, b in zip(outputs["naive"], outputs["tuneval"], strict=True))
    n = len(ds)
    print(f"\npipeline={args.pipeline} rows={n} max_new_tokens={args.max_new_tokens} device={device}")
    print(f"{'variant':<28}{'seconds':>9}{'samples/s':>11}{'vs naive':>10}")
    for name, label in (
        ("naive", f"naive (order, batch {args.naive_batch})"),
        ("tuneval", f"tuneval (sorted, {args.batch})"),
    ):
        print(f"{label:<28}{best[name]:>9.2f}{n / best[name]:>11.1f}{best['naive'] / best[name]:>9.2f}x")
    print(f"identical outputs: {agree}/{n}")


if __name__ == "__main__":
    main()
