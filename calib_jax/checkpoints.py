"""Orbax checkpoints of a training run: periodic + final, and the best by validation accuracy.

Layout under a run's work directory::

    checkpoints/<epoch>/   state (params, batch_stats, opt_state, step) + meta (JSON)
    best/<epoch>/          the checkpoint with the highest validation accuracy

``<epoch>`` counts *completed* epochs. Orbax writes each checkpoint into a
temporary directory and renames it when complete, so a run killed at any
moment leaves either a whole checkpoint or none; unfinished temporary
directories are ignored (and deleted when training opens the folders again:
``clean_up_unfinished``). A finished checkpoint that cannot be read back
(truncated or corrupted files) is skipped with a warning and the previous one
is used: it is never loaded. When training reaches that epoch again, the recomputed
state takes its place and the unreadable files are moved, not deleted, to
``unreadable/<folder>-<epoch>/`` (training is deterministic, so a resumed run still
ends with the parameters of an uninterrupted one). An unreadable best checkpoint is read
from its epoch's periodic checkpoint while that one is kept (both are saved from one state).
A best checkpoint whose metrics cannot be read, which Orbax could not rank (it would raise
on opening ``best/``), is moved there as soon as the run's checkpoints are opened. A
resumed run rewrites a best checkpoint of either kind from that periodic twin
(:meth:`RunCheckpoints.mend_best`), so the best state outlives the twin's rotation. A
checkpoint of another configuration (another tree of parameters or optimiser state, or
parameters of other shapes, e.g. a head for another number of classes, named from the
checkpoint's metadata) is refused with a ``ValueError``, not skipped: a run that skipped it
would start afresh and, rotating its kept checkpoints, delete the other configuration's.

Saves are asynchronous by default (``async_save=True``): :meth:`RunCheckpoints.save`
returns once the arrays are copied to host memory and the files are written by a
background thread while training goes on (a synchronous save of a ResNet-50 state
blocks for about a second per checkpoint, see ``benchmarks/NOTES.md``). The
temporary-directory-then-rename rule above holds for background writes too, and
:meth:`~RunCheckpoints.restore`, :meth:`~RunCheckpoints.wait` and
:meth:`~RunCheckpoints.close` wait for any write in flight. With several processes
(``jax.distributed``), every process calls ``save`` with the same work directory path;
each manager's barrier names carry a prefix derived from that path, so the background
saves of several managers (periodic and best, several members) may overlap.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["FOLDERS", "UNREADABLE_FOLDER", "RunCheckpoints", "saved_epochs", "state_to_tree",
           "tree_equal"]

#: The folders of a run's work directory that hold its periodic and its best checkpoints.
FOLDERS = {"latest": "checkpoints", "best": "best"}
#: Where :meth:`RunCheckpoints.save` moves a checkpoint that could not be read when it
#: saves the recomputed state of its epoch (beside ``FOLDERS``: Orbax never lists it).
UNREADABLE_FOLDER = "unreadable"


def state_to_tree(state) -> dict:
    """The checkpointed part of a :class:`calib_jax.train.TrainState`."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": state.rng}


def saved_epochs(workdir, which: str = "latest") -> list[int]:
    """The epochs checkpointed under ``workdir`` (``which``: ``"latest"`` = periodic, or
    ``"best"``), ascending, read from the folder names alone: no Orbax manager, so cheap enough
    for start-up checks and sweeps over many runs. A save in flight (Orbax's temporary folder)
    does not count; a complete but unreadable checkpoint does (:meth:`RunCheckpoints.restore`
    skips it)."""
    directory = Path(workdir) / FOLDERS[which]
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _manager(directory: Path, async_save: bool, **options) -> ocp.CheckpointManager:
    # With several processes (jax.distributed), background saves of different managers
    # in flight at once (periodic + best, several members) must not share Orbax's barrier
    # names: a prefix per directory, the same on every process (they share the work
    # directory's path).
    prefix = "calib_jax_" + hashlib.sha1(str(directory).encode()).hexdigest()[:16]
    return ocp.CheckpointManager(
        directory.resolve(),
        options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=async_save,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=prefix),
            **options),
        handler_registry=_handler_registry())


def _handler_registry():
    """The handlers of a checkpoint's two items. Named up front, not only learnt from the
    first save or restore: a manager opened on existing checkpoints (a resumed run, an
    evaluation) can then read a checkpoint's metadata (``_stored_shapes``; with item names
    alone Orbax returns None there and logs two "could not be restored" warnings per call)."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, handler, save, restore in (
            ("state", ocp.StandardCheckpointHandler, ocp.args.StandardSave,
             ocp.args.StandardRestore),
            ("meta", ocp.JsonCheckpointHandler, ocp.args.JsonSave, ocp.args.JsonRestore)):
        registry.add(item, save, handler)
        registry.add(item, restore, handler)
    return registry


def _unrankable(step_dir: Path) -> bool:
    """Whether a best checkpoint's metrics file (Orbax's ``metrics/metrics``) is there but
    holds no number ``val_accuracy``, the value ``best/`` ranks by: Orbax would raise on
    opening the folder. A checkpoint without that file is left to Orbax (a later Orbax
    may keep its metrics elsewhere: never move a checkpoint for that)."""
    path = step_dir / "metrics" / "metrics"
    if not path.is_file():
        return False
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return True
    return not (isinstance(metrics, dict)
                and isinstance(metrics.get("val_accuracy"), (int, float)))


def _sync_processes(name: str) -> None:
    """With several processes (``jax.distributed``), waits until every one gets here."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _another_configuration(error: ValueError) -> bool:
    """Whether Orbax refused a restore because the template is another configuration's
    (another tree of parameters or optimiser state, or an array of another shape, e.g. a
    head for another number of classes), rather than because the files are damaged."""
    message = str(error).lower()
    return ("tree structures do not match" in message
            or "shape" in message and "mismatch" in message
            # Orbax's message for a stored array of another shape (strict restore).
            or "not compatible with the stored shape" in message)


def _another_configuration_refusal(manager, step, detail: str) -> ValueError:
    """The refusal of a checkpoint written by another configuration, with what differs."""
    return ValueError(
        f"checkpoint {manager.directory}/{step} was written by a different model / optimiser "
        f"configuration than the one being restored ({detail}); use a new work directory (or "
        f"the original config).")


def _shapes(tree) -> dict:
    """``{path: shape}`` of the parameters and BatchNorm statistics of a state's tree (a
    template's, or a checkpoint's metadata tree)."""
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for part in ("params", "batch_stats")
            for path, leaf in jax.tree_util.tree_leaves_with_path({part: tree[part]})}


def _stored_shapes(manager, step) -> dict:
    """:func:`_shapes` of a checkpoint, read from its metadata alone (no array is read); empty
    where the metadata cannot be read or has another form (an Orbax version's): then the
    restore itself decides."""
    try:
        stored = manager.item_metadata(step)["state"]
        return _shapes(getattr(stored, "tree", stored))  # Orbax's TreeMetadata wraps the tree
    except Exception:  # noqa: BLE001 -- a pre-check only
        return {}


def _shape_differences(stored: dict, template_tree) -> list[str]:
    """The template's parameters and statistics that the checkpoint holds with another shape
    (e.g. a head for another number of classes), as ``"path: checkpoint S, template T"``."""
    return [f"{key}: checkpoint {stored[key]}, template {shape}"
            for key, shape in _shapes(template_tree).items()
            if key in stored and stored[key] != shape]


class RunCheckpoints:
    """Saves and restores a run's checkpoints (see the module docstring).

    Args:
      workdir: the run's directory.
      keep: periodic checkpoints to keep (the final one is one of them).
      async_save: write checkpoints in a background thread (see the module
        docstring); False makes :meth:`save` return only once the files are complete.
      clean_up_unfinished: delete the temporary folders of saves cut short (a process
        killed while it wrote a checkpoint: up to a whole state's size each, never
        readable) when the folders are opened. Only for the process that trains the run,
        holding its lock (training does): anyone else, e.g. an evaluation of a run still
        training, would delete a save in flight.
    """

    def __init__(self, workdir, *, keep: int = 3, async_save: bool = True,
                 clean_up_unfinished: bool = False):
        self.workdir = Path(workdir)
        self.latest = _manager(self.workdir / FOLDERS["latest"], async_save, max_to_keep=keep,
                               cleanup_tmp_directories=clean_up_unfinished)
        self.best = self._open_best(async_save, clean_up_unfinished)
        # Epochs that restore() found unreadable, per folder key: the only existing
        # checkpoints that save() replaces (see _set_aside).
        self._unreadable: dict[str, set[int]] = {"latest": set(), "best": set()}

    def _open_best(self, async_save: bool, clean_up_unfinished: bool) -> ocp.CheckpointManager:
        """The manager of ``best/``. Orbax reads every best checkpoint's metrics when it
        opens the folder, and raises on a damaged metrics file (a JSON error): the run could
        then neither resume nor be evaluated. Such checkpoints, which cannot be ranked, are
        moved to ``unreadable/`` first, with a warning (by process 0; every process waits for
        it before opening the folder). Every process notes their epochs before any is moved,
        so that :meth:`mend_best` saves on all of them or on none."""
        folder = self.workdir / FOLDERS["best"]
        # What mend_best may rewrite from their periodic twins.
        self._unrankable_best: set[int] = {
            epoch for epoch in saved_epochs(self.workdir, "best")
            if _unrankable(folder / str(epoch))}
        _sync_processes(f"calib_jax check {folder}")
        if jax.process_index() == 0:
            for epoch in sorted(self._unrankable_best):
                self._move_to_unreadable("best", epoch, "its metrics could not be read")
        _sync_processes(f"calib_jax open {folder}")
        return _manager(folder, async_save, max_to_keep=1,
                        best_fn=lambda m: m["val_accuracy"], best_mode="max",
                        keep_checkpoints_without_metrics=False,
                        cleanup_tmp_directories=clean_up_unfinished)

    def save(self, epoch: int, state, meta: dict, *, best_metrics: dict | None = None,
             periodic: bool = True):
        """Writes the state after ``epoch`` completed epochs.

        ``periodic`` saves under ``checkpoints/``; ``best_metrics`` (with a
        ``val_accuracy``) offers it to ``best/``, which keeps the highest.
        An epoch that already has a checkpoint is left as it is: training is
        deterministic, so a resumed multi-member run that recomputes an epoch
        some members had already saved produces the same state again. The
        exception is a checkpoint that :meth:`restore` found unreadable: it is
        moved to ``unreadable/`` and ``state`` is saved in its place (otherwise a
        run whose final checkpoint was damaged would retrain its last epochs on
        every rerun and never finish).

        With ``async_save`` it returns once ``state`` is copied to host memory
        (the caller may then donate or overwrite its arrays); the files follow in
        the background.
        """
        tree = state_to_tree(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                  meta=ocp.args.JsonSave(dict(meta, epoch=epoch)))
        if periodic:
            self._set_aside("latest", epoch)
            if epoch not in self.latest.all_steps():
                self.latest.save(epoch, args=args, force=True)
        if best_metrics is not None:
            self._set_aside("best", epoch)
            if epoch not in self.best.all_steps():
                self.best.save(epoch, args=args, metrics=best_metrics, force=True)

    def _set_aside(self, key: str, epoch: int, *, by: str = "") -> None:
        """Moves the checkpoint of ``epoch`` in ``FOLDERS[key]`` to ``unreadable/`` if
        :meth:`restore` found it unreadable, so that a save can take its place (``by``: what
        replaces it, for the warning; the recomputed epoch by default). Moved, not
        deleted: nothing a user saved is destroyed (it may be inspected, or removed by hand)."""
        if epoch not in self._unreadable[key]:
            return
        manager = getattr(self, key)
        manager.wait_until_finished()  # reload() below must not forget a save in flight
        if jax.process_index() == 0:
            self._move_to_unreadable(key, epoch, f"it could not be read; replaced by "
                                                 f"{by or f'the recomputed epoch {epoch}'}")
        _sync_processes(f"calib_jax set aside {self.workdir / FOLDERS[key]}/{epoch}")
        manager.reload()  # on every process: the manager's list of steps must lose it
        self._unreadable[key].discard(epoch)

    def _move_to_unreadable(self, key: str, epoch: int, why: str) -> None:
        """Renames ``FOLDERS[key]/<epoch>`` to ``unreadable/<folder>-<epoch>`` (``-2``, ...
        if taken), with a warning. Called by process 0 alone (the others wait for it)."""
        source = self.workdir / FOLDERS[key] / str(epoch)
        if not source.exists():
            return
        target = self.workdir / UNREADABLE_FOLDER / f"{FOLDERS[key]}-{epoch}"
        target.parent.mkdir(exist_ok=True)
        n = 1
        while target.exists():  # an earlier unreadable copy of the same epoch
            n += 1
            target = target.with_name(f"{FOLDERS[key]}-{epoch}-{n}")
        source.rename(target)
        warnings.warn(f"checkpoint {source}: {why}; moved to {target}.", RuntimeWarning)

    def wait(self):
        """Blocks until every checkpoint written so far is complete on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def _restore_from(self, manager, step, template_state):
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                          state_to_tree(template_state))
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        tree = restored["state"]
        state = template_state.replace(step=tree["step"], params=tree["params"],
                                       batch_stats=tree["batch_stats"],
                                       opt_state=tree["opt_state"], rng=tree["rng"])
        return state, dict(restored["meta"])

    def restore(self, template_state, which: str | int = "latest"):
        """Restores ``(state, meta)`` or returns None when there is nothing to restore.

        Args:
          template_state: a freshly created state, or an abstract one (leaves
            ``jax.ShapeDtypeStruct`` with shardings, e.g.
            :func:`calib_jax.train.abstract_state_for_config`): gives structure,
            shapes, dtypes and shardings.
          which: ``"latest"`` (newest readable periodic checkpoint), ``"best"``,
            or an epoch number. A best checkpoint that cannot be read is replaced by the
            periodic checkpoint of its epoch while that one is kept (the same state).
        """
        self.wait()
        key = "best" if which == "best" else "latest"
        manager = getattr(self, key)
        steps = sorted(manager.all_steps(), reverse=True)
        if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
            if int(which) not in steps:
                raise FileNotFoundError(
                    f"no checkpoint for epoch {which} in {self.latest.directory}; have {sorted(steps)}")
            steps = [int(which)]
        for step in steps:
            # Arrays of other shapes, from the metadata: refused before Orbax reads any array
            # (its own refusal, below, comes from inside its reads).
            differences = _shape_differences(_stored_shapes(manager, step),
                                             state_to_tree(template_state))
            if differences:
                raise _another_configuration_refusal(
                    manager, step, "; ".join(differences[:3])
                    + (f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""))
            try:
                return self._restore_from(manager, step, template_state)
            except ValueError as e:
                if _another_configuration(e):
                    # Not damage: the run directory belongs to another configuration.
                    # Refuse rather than skip, so that nothing saved is overwritten.
                    raise _another_configuration_refusal(manager, step, str(e)[:300]) from e
                error = e
            except Exception as e:  # a corrupt or partial checkpoint: never load it
                error = e
            same = self._periodic_of_best(step, template_state) if key == "best" else None
            self._skip_unreadable(key, step, error, then=(
                f"using {self.latest.directory}/{step}, saved from the same state" if same
                else "skipping it"))
            if same:
                return same
        return None

    def _periodic_of_best(self, step: int, template_state):
        """``(state, meta)`` of ``checkpoints/<step>`` for an unreadable ``best/<step>``, or None.

        :meth:`save` writes an epoch's periodic and best checkpoints from one state and one
        meta, so the periodic one, while it is kept, is the best state itself (the run's
        recorded best stays the same epoch; nothing is substituted). The damaged best stays
        listed as unreadable, so a run that recomputes the epoch still replaces it.
        """
        if step not in self.latest.all_steps() or step in self._unreadable["latest"]:
            return None
        try:
            return self._restore_from(self.latest, step, template_state)
        except Exception as e:  # noqa: BLE001 -- damaged too (or not this run's): never loaded
            if not (isinstance(e, ValueError) and _another_configuration(e)):
                self._skip_unreadable("latest", step, e)
            return None

    def mend_best(self, template_state) -> int | None:
        """Rewrites the newest best checkpoint from its epoch's periodic one when the best
        cannot be read, and returns that epoch (None when there was nothing to mend).

        :meth:`restore` reads an unreadable best from that periodic twin while it is kept,
        but the twin is rotated away as training goes on, and the best state would be lost
        with it. Training calls this when it resumes (it holds the run's lock: an evaluation,
        which only reads, does not write checkpoints). Covers both kinds of damage: arrays
        that cannot be read (found here, by reading the best checkpoint in full: 1.4-1.6 s for
        a ResNet-50 state on a 2-core CPU, once per resume and member) and metrics that
        cannot be read (moved aside on opening). The twin's ``best_val_accuracy`` (its meta,
        written with the state) is the rewritten checkpoint's metric: a best checkpoint is
        saved only by an epoch that improved on the best, so the two are the same number.
        A best with no readable twin stays as it is (an epoch recomputed later replaces it,
        see :meth:`save`).
        """
        listed = self.best.all_steps()
        epoch = max([*listed, *self._unrankable_best], default=None)
        if epoch is None:
            return None
        if epoch in listed:
            # restore() warns once, and returns the twin (or None) for unreadable arrays.
            restored = self.restore(template_state, "best")
            if epoch not in self._unreadable["best"] or restored is None \
                    or restored[1].get("epoch") != epoch:
                return None
        else:
            restored = self._periodic_of_best(epoch, template_state)
            if restored is None:
                return None
        state, meta = restored
        metric = meta.get("best_val_accuracy")
        if not isinstance(metric, (int, float)):  # a meta without it: cannot be ranked
            return None
        meta = {k: v for k, v in meta.items() if k != "epoch"}
        twin = f"{self.latest.directory}/{epoch}"
        self._set_aside("best", epoch, by=f"a copy of {twin}, saved from the same state")
        # Written in the background like any save (close() and restore() wait for it); the
        # twin it is copied from is already read into memory.
        self.save(epoch, state, meta, periodic=False, best_metrics={"val_accuracy": metric})
        if epoch in self._unrankable_best:
            self._unrankable_best.discard(epoch)
            warnings.warn(f"checkpoint {self.best.directory}/{epoch}: rewritten from {twin}, "
                          f"saved from the same state.", RuntimeWarning)
        return epoch

    def _skip_unreadable(self, key: str, step: int, error: Exception, *,
                         then: str = "skipping it") -> None:
        self._unreadable[key].add(step)
        warnings.warn(f"checkpoint {getattr(self, key).directory}/{step} could not be read "
                      f"({type(error).__name__}: {str(error)[:200]}); {then}.",
                      RuntimeWarning)

    def close(self):
        """Waits for writes in flight, then releases the managers."""
        self.wait()
        self.latest.close()
        self.best.close()


def tree_equal(a: Any, b: Any) -> bool:
    """Exact equality of two pytrees of arrays (for resume tests and checks)."""
    import numpy as np
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb))
