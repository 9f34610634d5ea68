"""Several training runs in one ``torchrun`` launch (the imports and the process group are paid for once).

``python -m torch.distributed.run --nproc_per_node 2 tests/engine/distributed_runs.py ITEM ...``, each ITEM either
a config file (trained with :func:`dama_engine.training.train`, one run after the other in the same processes, as
a worker runs job after job) or ``copy:SOURCE_RUN:STEP:TARGET_RUN``: rank 0 puts what a run killed right after
checkpoint STEP leaves on disk into TARGET_RUN (that checkpoint, the metrics log, the cache), so the next config,
whose ``run.output_dir`` is TARGET_RUN, resumes from it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from dama_engine.config import load_config
from dama_engine.training import checkpoint_dir, train


def _copy_killed_run(source: Path, step: int, target: Path) -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
        return
    checkpoint = checkpoint_dir(source, step)
    shutil.copytree(checkpoint, checkpoint_dir(target, step))
    shutil.copyfile(source / "metrics.jsonl", target / "metrics.jsonl")
    shutil.copytree(source / "cache", target / "cache")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def main(items: list[str]) -> None:
    for item in items:
        if item.startswith("copy:"):
            _, source, step, target = item.split(":")
            _copy_killed_run(Path(source), int(step), Path(target))
        else:
            train(load_config(item))


if __name__ == "__main__":
    main(sys.argv[1:])
