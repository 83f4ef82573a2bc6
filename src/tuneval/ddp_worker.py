"""One data-parallel finetune process: ``torchrun ... -m tuneval.ddp_worker ARGS.json``.

Started by the finetune stage (``distributed.launch``) when ``train.devices`` > 1. Every rank
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

from tuneval import distributed, stages
from tuneval.artifacts import ArtifactRef
from tuneval.config.runs import RunSpec
from tuneval.errors import TunevalError
from tuneval.settings import Settings


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
            meta = stages.train_and_save(run, settings, prepared, Path(args["out"]), work_dir, args["progress"], dist)
        except TunevalError as e:  # any rank (an out-of-memory may hit one alone)
            report_user_error(work_dir, dist.rank, e)
            return 2
        if dist.is_main:
            (work_dir / distributed.RESULT_FILE).write_text(json.dumps(meta))
    return 0


def report_user_error(work_dir: Path, rank: int, error: TunevalError) -> None:
    """For the stage to raise again as one line; written atomically, the last rank's text wins."""
    tmp = work_dir / f"{distributed.ERROR_FILE}.{rank}"
    tmp.write_text(json.dumps({"message": str(error)}))
    tmp.replace(work_dir / distributed.ERROR_FILE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
