"""Checkpoints under `<output>/checkpoints/`: written completely, then published, then the oldest pruned.

    checkpoints/step-00000300/state.pt                       the training state (below), one file
    checkpoints/step-00000300/pytorch_lora_weights.safetensors, adapter_config.json, longcat_video_lora.safetensors
    checkpoints/latest                                       {"step": 300, "prefix": "checkpoints/step-00000300/"}

A checkpoint exists once `latest` names it: a writer killed halfway leaves a folder nobody reads, and a
resumed job starts from the last complete one. The state is one explicit dict: LoRA weights, optimizer,
LR scheduler, step, data position, loss history and every rank's RNG states.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import signal
import threading
from typing import Any

import torch
from botocore.exceptions import BotoCoreError, ClientError

from longcat_job import output_layout
from longcat_job.storage import LocalStore, ObjectStore, S3Store

log = logging.getLogger(__name__)

PREFIX = output_layout.CHECKPOINTS
LATEST = output_layout.LATEST_CHECKPOINT
STATE = output_layout.CHECKPOINT_STATE
_STEP_DIR = re.compile(r"^step-(\d+)/")


step_prefix = output_layout.checkpoint_prefix


def rng_state() -> dict[str, Any]:
    """The global RNGs (LoRA dropout); the training noise is drawn per slot (flow.slot_noise) and needs none."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(store: ObjectStore, step: int, state: dict[str, Any], files: dict[str, bytes], keep: int) -> str:
    """Write one checkpoint, publish it as latest, keep the newest `keep`; returns its prefix."""
    prefix = step_prefix(step)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    for name, data in files.items():
        store.put_bytes(prefix + name, data)
    store.put_bytes(prefix + STATE, buffer.getvalue())  # last: a folder with state.pt has every file
    store.put_bytes(LATEST, json.dumps({"step": step, "prefix": prefix}).encode())
    prune(store, keep)
    return prefix


def load_latest(store: ObjectStore) -> dict[str, Any] | None:
    """The state of the published checkpoint, or None when the job has none yet."""
    if not _exists(store, LATEST):
        return None
    pointer = json.loads(store.get_bytes(LATEST))
    log.info("resuming from %s (step %d)", pointer["prefix"], pointer["step"])
    return torch.load(io.BytesIO(store.get_bytes(pointer["prefix"] + STATE)), weights_only=False)


def _exists(store: ObjectStore, key: str) -> bool:
    try:
        return any(record.key == key for record in store.list())
    except FileNotFoundError:  # a local output directory not created yet
        return False


def prune(store: ObjectStore, keep: int) -> None:
    by_step: dict[int, list[str]] = {}
    for record in store.list():
        if record.key.startswith(PREFIX) and (m := _STEP_DIR.match(record.key[len(PREFIX) :])):
            by_step.setdefault(int(m.group(1)), []).append(record.key)
    for step in sorted(by_step)[:-keep]:
        delete(store, by_step[step])


def delete(store: ObjectStore, keys: list[str]) -> None:
    """The ObjectStore protocol has no delete yet; the two stores are handled here."""
    if isinstance(store, LocalStore):
        for key in keys:
            (store.root / key).unlink(missing_ok=True)
        return
    if isinstance(store, S3Store):
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = [{"Key": store.prefix + key} for key in keys[start : start + 1000]]
            try:
                store.client.delete_objects(Bucket=store.bucket, Delete={"Objects": chunk, "Quiet": True})
            except (ClientError, BotoCoreError) as exc:
                raise store.error(exc) from None
        return
    raise TypeError(f"cannot delete from {type(store).__name__}")


class Preemption:
    """Remembers a SIGTERM (Kubernetes gives ~30 s before SIGKILL) or Ctrl-C, so that the loop saves and stops.

    A second Ctrl-C stops at once, without a checkpoint.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("%s: saving a checkpoint at the end of this step, then exiting", signal.Signals(signum).name)
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
