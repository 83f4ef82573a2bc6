"""Start a data-parallel finetune: ``torchrun --standalone --nproc-per-node N -m MODULE ARGS.json``.

The finetune stage stays the coordinator: it starts the processes, one per device (nccl on CUDA,
gloo on CPU); rank 0 writes the model and curves into the stage's build folder, and the stage
commits it as usual.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tuneval.errors import TunevalError

log = logging.getLogger(__name__)

ARGS_FILE, RESULT_FILE, ERROR_FILE = "ddp-args.json", "ddp-result.json", "ddp-error.json"


def launch(devices: int, args: dict[str, Any], work_dir: Path, module: str) -> dict[str, Any]:
    """Run ``module`` (the worker) under torchrun with ``args`` and return rank 0's result.

    A user error inside a worker (e.g. a NaN loss) comes back as the same ``TunevalError``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    for name in (RESULT_FILE, ERROR_FILE):
        (work_dir / name).unlink(missing_ok=True)
    args_file = work_dir / ARGS_FILE
    args_file.write_text(json.dumps(args, default=str))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={devices}",
        "-m",
        module,
        str(args_file),
    ]
    log.info("finetune: %d processes: %s", devices, " ".join(cmd))
    # The cores shared among the processes (torchrun would set 1 and warn about it).
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // devices))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    _relay(proc.stderr, quiet=(work_dir / ERROR_FILE).exists)
    code = proc.wait()
    if (work_dir / ERROR_FILE).exists():
        raise TunevalError(json.loads((work_dir / ERROR_FILE).read_text())["message"])
    if code != 0 or not (work_dir / RESULT_FILE).exists():
        raise RuntimeError(f"finetune: torchrun with {devices} processes failed (exit code {code}); see its log above")
    return json.loads((work_dir / RESULT_FILE).read_text())


def _relay(stream: IO[bytes], quiet: Callable[[], bool]) -> None:
    """Forward the workers' stderr live (rank 0's progress bar), until a worker has reported a user
    error: torchrun's failure report that follows (a ChildFailedError traceback) would bury its one line."""
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    for chunk in iter(lambda: stream.read1(1 << 14), b""):  # type: ignore[attr-defined]
        if not quiet():
            sys.stderr.write(decode(chunk))
            sys.stderr.flush()


def settings_to_json(settings: Any) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}
