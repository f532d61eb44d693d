"""Context parallelism on the CPU: torchrun with gloo runs tests/context_parallel_worker.py in 2 and 4 processes.

Per launch (see the worker): an I2V batch split over groups of 2 (and of 4) gives the unsplit model's output and
LoRA gradients; groups of 2 under DDP train 5 steps to the LoRA of one process accumulating over the groups.
(Compiled blocks with selective checkpointing gave the same gradients too, but inductor on the CPU takes minutes.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from longcat_job.failures import InvalidConfigError
from longcat_trainer.model import context_parallel
from longcat_trainer.model.dit import LongCatVideoTransformer3DModel
from longcat_trainer.model.tiny import TINY_DIT_CONFIG
from tests.fixtures.cluster import free_port

WORKER = Path(__file__).with_name("context_parallel_worker.py")
ROOT = WORKER.parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_split_samples_train_as_one_process(processes: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("context parallel checks passed") == processes


def test_a_group_that_does_not_divide_the_heads_is_refused_with_the_field() -> None:
    dit = LongCatVideoTransformer3DModel(**TINY_DIT_CONFIG)  # 2 heads
    with pytest.raises(InvalidConfigError, match=r"spec.training.contextParallel=4 must divide the model's 2"):
        context_parallel.enable(dit, context_parallel.ContextParallel(group=None, size=4, rank=0))
    assert dit.context_parallel is None
