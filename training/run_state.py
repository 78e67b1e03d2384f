"""A training run's folder: never overwritten without being asked, resumed exactly, and saved on a signal.

- A folder that holds a run is continued with ``--resume`` or replaced with ``--overwrite``; anything else is
  refused before any work (a re-run must not silently replace a checkpoint, metrics and exports).
- On ``--resume`` the checkpoint's settings are compared with this run's, one by one: those that define the
  hypernetwork or the run's randomness are refused by name; the rest (learning rate, weight decay, loss
  weights, logging, ...) may change and take effect from the checkpoint's step.
- SIGINT (Ctrl-C) and SIGTERM (what schedulers and container stops send) raise :class:`Interrupted`, but
  never inside a training step: a signal that arrives mid-step waits for the step (and its metrics line)
  to finish, so the checkpoint written on the way out holds whole steps and is labelled with the last one.
- Temporary files that killed writes left behind are removed at the next start.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
import threading
from pathlib import Path

from hypernet.files import remove_orphan_temporaries

from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .config import HYPERNET_OPTIONS
from .config_checks import flag
from .errors import RunRefused

log = logging.getLogger("training")

# What a run writes into its output folder (removed by --overwrite; their presence means "a run is here").
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "config.json", "hypernet.safetensors", "subject_lora.safetensors",
             "subject_lora.compact.safetensors", "validation.png")
RUN_FOLDERS = ("samples", "tensorboard", "synthetic_data", "synthetic_heldout", "synthetic_eval")
# Settings that define the hypernetwork's shape and outputs, or the run's randomness: fixed for the run's life.
FIXED_ON_RESUME = HYPERNET_OPTIONS + ("token_embedding", "text_encoder_targets", "hidden_state", "seed")
# Not settings of the run: how this invocation was started.
NOT_COMPARED = ("resume", "overwrite")


def refuse(message: str) -> None:
    """Raise :class:`RunRefused` (``main()`` reports it in one line with exit status 2, as for a bad option)."""
    raise RunRefused(message)


def check_output_dir(config) -> dict | None:
    """Before any work: the checkpoint to resume from (``--resume``), else None; refuses with one line otherwise.

    Read-only, so every process of a multi-process run can call it; :func:`clear_run` does the deleting.
    """
    output_dir = Path(config.output_dir)
    if config.resume and config.overwrite:
        refuse("--resume and --overwrite contradict each other: continue the run in --output-dir, or start it over")
    if not config.resume:
        found = [name for name in RUN_FILES if (output_dir / name).exists()]
        if found and not config.overwrite:
            refuse(f"--output-dir {output_dir} already holds a training run ({', '.join(found)}): continue it with --resume, "
                   "start it over with --overwrite (deletes it), or choose another --output-dir")
        return None
    if not (output_dir / CHECKPOINT_NAME).is_file():
        refuse(f"--resume: no checkpoint in {output_dir} ({CHECKPOINT_NAME} is missing); start a new run without --resume")
    try:
        state = load_checkpoint(output_dir)
    except Exception as error:  # a damaged or foreign file: torch and pickle raise many kinds
        refuse(f"--resume: {output_dir / CHECKPOINT_NAME} cannot be read ({type(error).__name__}: {error}); "
               "start over with --overwrite")
    if not isinstance(state, dict) or not {"step", "config", "hypernet", "optimizer", "scheduler"} <= set(state):
        refuse(f"--resume: {output_dir / CHECKPOINT_NAME} is not a training checkpoint of this trainer; start over with --overwrite")
    check_resume_settings(config, state)
    return state


def check_resume_settings(config, state: dict) -> None:
    """Refuse, by name, settings that cannot change on resume; say which changed settings take effect."""
    saved, current = state["config"], config.to_dict()
    fixed = [name for name in FIXED_ON_RESUME if name in saved and saved[name] != current[name]]
    if fixed:
        changes = ", ".join(f"{flag(name)} {saved[name]!r} (asked: {current[name]!r})" for name in fixed)
        refuse(f"--resume: the checkpoint was trained with {changes}; these settings define the hypernetwork or the run's "
               "randomness and cannot change on resume. Resume with the checkpoint's values, or start a new run (--overwrite or another --output-dir)")
    if config.max_steps < state["step"]:
        refuse(f"--resume: the checkpoint is at step {state['step']}, past --max-steps {config.max_steps}; "
               f"give --max-steps {state['step']} or more")
    changed = [name for name in current if name in saved and name not in NOT_COMPARED and saved[name] != current[name]]
    if changed:
        print("resuming with changed settings, applied from step "
              f"{state['step']}: " + ", ".join(f"{flag(name)} {saved[name]!r} -> {current[name]!r}" for name in changed), flush=True)


def clear_run(output_dir: str | Path) -> list[str]:
    """``--overwrite``: delete what a previous run wrote (and only that); returns the names removed."""
    output_dir = Path(output_dir)
    removed = []
    for name in RUN_FILES:
        if (output_dir / name).exists():
            (output_dir / name).unlink()
            removed.append(name)
    for name in RUN_FOLDERS:
        if (output_dir / name).is_dir():
            shutil.rmtree(output_dir / name)
            removed.append(name + "/")
    if removed:
        print(f"--overwrite: removed the previous run's {', '.join(removed)} from {output_dir}", flush=True)
    return removed


def remove_leftovers(output_dir: str | Path) -> None:
    """Temporary files of writes that a kill interrupted (``.checkpoint.pt.1a2b3c4d.tmp``)."""
    removed = remove_orphan_temporaries(output_dir) + remove_orphan_temporaries(Path(output_dir) / "samples")
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write (%s)", len(removed), removed[0].name)


def apply_optimizer_settings(optimizer, scheduler, config) -> None:
    """After loading a checkpoint's optimizer and scheduler: this run's learning rate and weight decay take
    effect (the loaded state holds the old ones), at the scheduler's current point of the warm-up."""
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch) if hasattr(scheduler, "lr_lambdas") else 1.0
    for group in optimizer.param_groups:
        group["initial_lr"] = config.learning_rate
        group["lr"] = config.learning_rate * factor
        group["weight_decay"] = config.weight_decay
    scheduler.base_lrs = [config.learning_rate] * len(optimizer.param_groups)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def read_metrics_lines(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a damaged line (a kill while it was written) is dropped with a message."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            print(f"{path}: dropped line {number}, which is incomplete or damaged (a run killed while writing it)", flush=True)
            continue
        records.append(record)
    return records


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int, where: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.where = signum, where
        self.exit_code = 128 + signum


class Interrupts:
    """SIGINT and SIGTERM as :class:`Interrupted`, held back while a step is in flight.

    ``hold()`` ... ``release()`` bracket one training step: a signal in between is remembered and raised by
    ``release()``. Outside (sample grids, checkpoint writes) it is raised at once. Handlers are installed
    only in the main thread (Python's rule) and restored on exit.
    """

    def __init__(self):
        self.where = "before training started"  # what an interruption outside the loop means, for the message
        self.held = False
        self.pending: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.held:
            if self.pending is None:
                print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint", file=sys.stderr, flush=True)
            self.pending = signum
            return
        raise Interrupted(signum, self.where)

    def hold(self) -> None:
        self.held = True

    def release(self, raise_pending: bool = True) -> None:
        self.held = False
        if self.pending is not None and raise_pending:
            signum, self.pending = self.pending, None
            raise Interrupted(signum, self.where)
