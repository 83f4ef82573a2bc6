"""One data-parallel finetune process: ``torchrun ... -m tuneval.pipeline.ddp_worker ARGS.json``.

Started by the finetune stage (``training.launch``) when ``train.devices`` > 1. Every rank
trains on its shard of each global batch; rank 0 writes the model and curves into the stage's
build folder and its meta into the work folder, where the stage picks them up and commits.
A user error (``TunevalError``) is written for the stage to raise again, not printed as a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

from tuneval.config.runs import RunSpec
from tuneval.errors import TunevalError
from tuneval.pipeline.finetune import train_and_save
from tuneval.pipeline.store import ArtifactRef
from tuneval.settings import Settings
from tuneval.training import distributed, launch


def main(args_file: str) -> int:
    args = json.loads(Path(args_file).read_text())
    run = RunSpec.model_validate(args["run"])
    raw = args["settings"]
    settings = Settings(**{**raw, "project_dir": Path(raw["project_dir"]), "cache_dir": Path(raw["cache_dir"])})
    prepared = ArtifactRef(**args["prepared"])
    work_dir = Path(args["work_dir"])
    with distributed.process_group(settings.device) as (dist, device):
        logging.basicConfig(level=logging.WARNING if dist.is_main else logging.ERROR)
        settings = dataclasses.replace(settings, device=str(device))
        try:
            meta = train_and_save(run, settings, prepared, Path(args["out"]), work_dir, args["progress"], dist)
        except TunevalError as e:  # any rank (an out-of-memory may hit one alone)
            report_user_error(work_dir, dist.rank, e)
            return 2
        if dist.is_main:
            (work_dir / launch.RESULT_FILE).write_text(json.dumps(meta))
    return 0


def report_user_error(work_dir: Path, rank: int, error: TunevalError) -> None:
    """For the stage to raise again as one line; written atomically, the last rank's text wins."""
    tmp = work_dir / f"{launch.ERROR_FILE}.{rank}"
    tmp.write_text(json.dumps({"message": str(error)}))
    tmp.replace(work_dir / launch.ERROR_FILE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
