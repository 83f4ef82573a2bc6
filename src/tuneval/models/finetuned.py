"""A finetune artifact's ``model/`` folder, with or without adapters, written and read back.

Without adapters the problem writes its own layout (``problem.save_model``). With adapters the
folder holds only what training changed, plus how to rebuild the rest:

- ``trained.safetensors``: every parameter that required gradients (the LoRA matrices, the head,
  any other fresh module), under its name in the task model;
- ``tuneval_adapter.json``: the problem, the run's spec (model source, benchmark, train recipe),
  the adapted layers, the base model's fingerprint, the problem's ``info``;
- the tokenizer (a pad token may have been added to it).

Loading rebuilds the task model from the base model exactly as the finetune stage built it, attaches
the same adapters and loads the trained tensors; the base's fingerprint must still match.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneval.errors import ModelError
from tuneval.models import loading

if TYPE_CHECKING:  # torch and peft load with the first model, not when a cached run plans
    import torch.nn as nn

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "tuneval_adapter.json"
TRAINED_FILE = "trained.safetensors"


def has_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def prepare(model: nn.Module, run: Any) -> list[str]:
    """Attach the run's adapters to a freshly built task model; returns the adapted layers ([] without)."""
    spec = run.train.adapter
    if spec is None:
        return []
    from tuneval.models import adapters

    targets = adapters.resolve_targets(model, spec.target_modules, "train.adapter.target_modules")
    adapters.attach(model, spec, targets)
    model.tuneval_adapter_targets = targets
    return targets


def save(problem: Any, model: nn.Module, tokenizer: Any, folder: Path, info: dict[str, Any], run: Any) -> None:
    if run is None or run.train.adapter is None:
        problem.save_model(model, tokenizer, folder, info)
        return
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    trained = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trained, str(folder / TRAINED_FILE))
    tokenizer.save_pretrained(folder)
    meta = {
        "problem": problem.NAME,
        "run": run.model_dump(mode="json"),
        "targets": list(getattr(model, "tuneval_adapter_targets", [])),
        "base": {
            "source": run.model.source,
            "path": run.model_path,
            "gguf_file": run.model.gguf_file,
            "fingerprint": base_fingerprint(run),
        },
        "info": info,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=1))


def base_fingerprint(run: Any) -> str:
    return loading.files_fingerprint(run.source)


def _on_this_machine(run: Any) -> Any:
    """A ``package:`` base lives wherever this machine installed the package (another venv, another
    host loading the MLflow model): find it again rather than trust the path recorded at training."""
    from tuneval.config.paths import PACKAGE_PREFIX, resolve_model_source

    if Path(run.model_path).exists() or not run.model.source.startswith(PACKAGE_PREFIX):
        return run
    try:
        return run.model_copy(update={"model_path": resolve_model_source(run.model, Path.cwd())})
    except ValueError as e:
        raise ModelError(f"the adapter's base model {run.model.source}: {e}") from None


def load(problem: Any, folder: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, info) of a finetune artifact's ``model/`` folder, adapters or not."""
    if not has_adapter(folder):
        return problem.load_model(folder)
    from safetensors.torch import load_file

    from tuneval.config.runs import RunSpec
    from tuneval.models import adapters
    from tuneval.training.device import seed_everything

    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    run = _on_this_machine(RunSpec.model_validate(meta["run"]))
    if base_fingerprint(run) != meta["base"]["fingerprint"]:
        raise ModelError(
            f"{folder}: its adapter was trained on {meta['base']['source']} ({meta['base']['path']}) with "
            f"fingerprint {meta['base']['fingerprint'][:12]}, and the model there has changed; "
            "re-run the finetune stage (--force finetune) or restore that model"
        )
    tokenizer = loading.load_tokenizer(str(folder))
    seed_everything(run.seed)  # fresh modules are overwritten below; fixed anyway
    model = problem.build_model(run, tokenizer, meta["info"])
    adapters.attach(model, run.train.adapter, meta["targets"])
    trained = load_file(str(folder / TRAINED_FILE))
    missing, unexpected = model.load_state_dict(trained, strict=False)
    left_out = [n for n in missing if n in {k for k, p in model.named_parameters() if p.requires_grad}]
    if unexpected or left_out:
        raise ModelError(
            f"{folder}: {TRAINED_FILE} does not fit the rebuilt model "
            f"(unexpected: {unexpected[:3]}, missing: {left_out[:3]}); re-run the finetune stage"
        )
    return model, tokenizer, meta["info"]
