"""Runs many cells one after another: train (resumable), then the evaluation pass.

Usage:
  python experiments/sweep.py --cells 'cifar10/resnet50/*' --workroot runs/paper [--dry-run]
      [--set num_epochs=1,batch_size=64]

``--cells`` takes shell-style patterns over ``dataset/model/loss`` (comma
separated); a cell whose evaluation exists (``eval_final/results.json``, or ``eval_best/`` for
the recipes that report the best-validation checkpoint: 20 Newsgroups and SST, as the
reference) and whose ``config.json`` is the config the sweep would train (``--set`` included)
is skipped, and a half-trained cell resumes
from its checkpoint, so the sweep can be restarted at any time. A cell finished under another
config is not "done": a shorter run (e.g. an earlier ``--set num_epochs=1``) is trained on to
the full length and evaluated again; any other difference is refused by the training (it
names the fields). Each cell's work directory is ``<workroot>/<dataset>/<model>/<loss>``.

``--vmap-rows`` trains the selected, unfinished cells of one row (dataset and
model) that share a recipe as one vmapped program
(``cell=<dataset>/<model>/[loss,...]``); every member still lands in its own
cell directory, so the results and ``build_tables.py`` do not change. Cells checkpointed up
to different epochs (a sweep stopped midway, then run with other cells) train in separate
programs, so none loses its progress (``split_by_progress``).

Replicates for error bars: ``--seeds 1,2,3`` trains every selected cell with each seed, the
recipe's seed (1) in ``<loss>/`` as without ``--seeds`` (so a finished sweep's cells are
done), each other seed ``s`` in ``<loss>-seed<s>/`` (with ``--vmap-rows``, a row's cells that
share a recipe train with all its other seeds as one program when there are two or more:
``cell=<dataset>/<model>/[losses],seeds=[2,3]``, ``other_seed_jobs``); ``build_tables.py`` then
gives mean ± std over a cell's runs.
Equivalently, one work root per seed (``--workroot runs/paper-seed2 --set seed=2``) given
together to ``build_tables.py --workroot``. ``--set seeds=...`` and ``--set loss=...`` are
refused: a cell is one run.

``--bootstrap N`` evaluates with bootstrap intervals (``calib_jax.evaluate --bootstrap N``:
``results.json``'s ``test_intervals``); a cell evaluated without intervals of ``N`` resamples
(or, by an earlier version, without OOD AUROC's) is then not done: its finished training is
resumed (nothing to train) and evaluated again. One evaluated before ``ece_sweep`` had an
interval stays done (that metric is in no table; ``calib_jax.evaluate --bootstrap N`` on the
cell adds it).

Every run's config is validated before the first run trains (and in ``--dry-run``): a bad
``--set`` value or seed is refused at once, naming the field.
A failing cell (e.g. a data set that is not on this machine) stops the sweep; with
``--keep-going`` the sweep goes on with the next cells, lists the failed ones at the end and
exits with status 1 (for unattended sweeps: one missing data set does not waste the night).

Several sweeps may run over one work root at once (e.g. one per GPU, each with
``CUDA_VISIBLE_DEVICES``): a run holds a lock on its directories while it trains
(``calib_jax.files.hold_directory_lock``), so a sweep that reaches a run another process is
training says ``busy`` and goes on with the next (not a failure), and one that reaches a run
another sweep has finished and evaluated since it started says ``done``. The list of cells (and
``--dry-run``) names the process training a cell now.
"""

import argparse
import fnmatch
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "configs"))
import paper  # noqa: E402


def selected(patterns):
    return [c for c in paper.cells() if any(fnmatch.fnmatch("/".join(c), p) for p in patterns)]


def newest_epoch(run_dir):
    """The newest epoch checkpointed in ``run_dir``; None without any."""
    from calib_jax import checkpoints

    return max(checkpoints.saved_epochs(run_dir), default=None)


def split_by_progress(losses, row_dir):
    """``losses`` (one recipe's cells of a row) in groups of cells saved up to the same epoch.

    One program restarts all its members from the newest epoch they all have, so a
    half-trained cell grouped with new ones would train again from epoch 0; cells at
    different epochs therefore train in separate programs, each resuming where it stopped.
    """
    groups = {}  # newest checkpointed epoch (None: none) -> cells
    for loss in losses:
        groups.setdefault(newest_epoch(Path(row_dir) / loss), []).append(loss)
    return list(groups.values())


def other_seed_jobs(workroot, todo, vmap_rows):
    """The jobs of the seeds other than the recipe's: ``todo`` maps each such seed (in
    ``--seeds`` order) to ``{(dataset, model): unfinished losses}``.

    With ``vmap_rows``, a row's losses unfinished for every one of its two or more other seeds,
    sharing a recipe and checkpointed to the same epoch, train as one program
    (``cell=<dataset>/<model>/[losses],seeds=[...]``: its members are named
    ``<loss>-seed<s>``); everything else, and everything without ``vmap_rows``, trains one run
    per program (a program with a single seed would name its members ``<loss>``, the recipe
    seed's directories).
    """
    jobs, pending = [], []  # pending: (dataset, model, loss, seed) still without a job
    for seed, rows in todo.items():
        pending += [(d, m, loss, seed) for (d, m), losses in rows.items() for loss in losses]
    for dataset, model in dict.fromkeys((d, m) for d, m, _, _ in pending) if vmap_rows else ():
        row_dir = workroot / dataset / model
        row_seeds = list(dict.fromkeys(s for d, m, _, s in pending if (d, m) == (dataset, model)))
        common = [loss for loss in todo[row_seeds[0]][(dataset, model)]
                  if all((dataset, model, loss, s) in pending for s in row_seeds)]
        if len(row_seeds) < 2 or not common:
            continue
        for group in paper.row_groups(dataset, model, common):
            if len({newest_epoch(row_dir / f"{loss}-seed{s}")
                    for loss in group for s in row_seeds}) > 1:  # one program restarts its members from a shared epoch
                continue
            losses = group[0] if len(group) == 1 else f"[{','.join(group)}]"
            spec = f"cell={dataset}/{model}/{losses},seeds=[{','.join(map(str, row_seeds))}]"
            jobs.append((spec, row_dir, [row_dir / f"{loss}-seed{s}"
                                         for loss in group for s in row_seeds]))
            pending = [p for p in pending
                       if not ((p[0], p[1]) == (dataset, model) and p[2] in group)]
    for dataset, model, loss, seed in pending:
        run_dir = workroot / dataset / model / f"{loss}-seed{seed}"
        jobs.append((f"cell={dataset}/{model}/{loss},seed={seed}", run_dir, [run_dir]))
    return jobs


def finished(workdir, config, bootstrap: int = 0) -> tuple[bool, str]:
    """``(done, why not)``: a run is done when the evaluation of its ``eval_checkpoint`` exists
    and its ``config.json`` computes what ``config`` does (``num_epochs`` included; a changed
    ``eval_checkpoint`` is not done either, its results are of the other checkpoint), and, with
    ``bootstrap`` > 0, the evaluation holds intervals of that many resamples, for OOD AUROC
    too."""
    from calib_jax import evaluate, train

    which = evaluate.table_checkpoint(config)  # final; best for the text data sets
    results = Path(workdir) / evaluate.default_out_name(which) / "results.json"
    if not results.exists():
        return False, ""
    changed = train.config_differences(workdir, config, ignore=train.EXECUTION_FIELDS)
    if changed is None:
        return False, " (results without a config.json)"
    if changed:
        return False, f" (its results are of another config: {'; '.join(changed)})"
    if bootstrap:
        saved = json.loads(results.read_text())
        intervals = saved.get("test_intervals", {})
        if intervals.get("num_resamples") != bootstrap:
            return False, f" (its results have no bootstrap intervals of {bootstrap} resamples)"
        if set(saved["test"]["before"]["ood_auroc"]) - set(
                intervals["before"].get("ood_auroc", {})):
            return False, " (its results have no bootstrap intervals of OOD AUROC: evaluated " \
                          "by an earlier version)"
    return True, ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--cells", required=True,
                        help="comma-separated shell-style patterns over dataset/model/loss, "
                             "e.g. 'cifar10/*/*,cifar100/resnet110/flsd53'")
    parser.add_argument("--workroot", default="runs/paper",
                        help="cell directories go to <workroot>/<dataset>/<model>/<loss> "
                             "(default: %(default)s)")
    parser.add_argument("--set", default="", help="config overrides, key=value,...")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the cells (done / todo) and the runs, train nothing")
    parser.add_argument("--vmap-rows", action="store_true",
                        help="train each row's cells that share a recipe as one program")
    parser.add_argument("--keep-going", action="store_true",
                        help="after a failing cell go on with the others; exit 1 at the end")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="evaluate with 95%% bootstrap intervals from N resamples of the "
                             "test set (e.g. 1000; default 0: none)")
    parser.add_argument("--seeds", default="",
                        help="comma-separated seeds, for error bars: the recipe's seed trains "
                             "in <loss>/, any other seed s in <loss>-seed<s>/ (default: the "
                             "recipe's seed alone)")
    args = parser.parse_args(argv)
    from calib_jax import bootstrap

    try:
        bootstrap.check_num_resamples(args.bootstrap, "--bootstrap", zero_allowed=True)
    except ValueError as e:
        parser.error(str(e))
    cells = selected(args.cells.split(","))
    if not cells:
        parser.error(f"no cell matches {args.cells!r}")
    rest = f",{args.set}" if args.set else ""
    overrides = [item.split("=", 1)[0].strip()
                 for item in (paper.cifar10.split_overrides(args.set) if args.set else [])]
    if "seeds" in overrides or "loss" in overrides:
        # Either would put several runs in a cell's directory, where neither the done-check
        # nor build_tables.py looks for them.
        parser.error(f"--set {args.set}: a cell is one loss and one seed; for replicates over "
                     "seeds use --seeds 1,2,3 (or one work root per seed: --set seed=N); for "
                     "several losses in one program use --vmap-rows")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds}: give integers, comma separated, e.g. --seeds 1,2,3")
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds {args.seeds}: a seed is given twice")
    if seeds and "seed" in overrides:
        parser.error(f"--set {args.set} and --seeds {args.seeds}: give the seeds in --seeds "
                     "alone")
    try:  # an unknown field or a value of the wrong type in --set: one message, not a traceback
        paper.get_config(f"cell={'/'.join(cells[0])}{rest}")
    except ValueError as error:
        parser.error(f"--set {args.set}: {error}")
    from calib_jax import evaluate, train
    from calib_jax.files import DirectoryInUseError, lock_holder

    todo = {}  # seed (None: the recipe's) -> {(dataset, model): unfinished losses}
    for dataset, model, loss in cells:
        recipe = paper.get_config(f"cell={dataset}/{model}/{loss}{rest}")
        for seed in seeds or [recipe.seed]:
            other = None if seed == recipe.seed else seed  # a replicate: its own directory
            spec = f"cell={dataset}/{model}/{loss}" + ("" if other is None else f",seed={other}")
            workdir = Path(args.workroot) / dataset / model / (
                loss if other is None else f"{loss}-seed{other}")  # build_tables' replicates
            done, why = finished(workdir, recipe if other is None else
                                 paper.get_config(spec + rest), args.bootstrap)
            holder = None if done else lock_holder(workdir)
            if holder:  # another sweep (or command) is training it now: it will be "busy"
                why += f" (being trained by another process: {holder})"
            print(f"{'done ' if done else 'todo '} {spec} -> {workdir}{why}", flush=True)
            if not done:
                todo.setdefault(other, {}).setdefault((dataset, model), []).append(loss)
    jobs = []  # (config spec, work directory, the cell directories it writes)
    for (dataset, model), losses in todo.get(None, {}).items():
        row_dir = Path(args.workroot) / dataset / model
        groups = [part for group in paper.row_groups(dataset, model, losses)
                  for part in split_by_progress(group, row_dir)] if args.vmap_rows else \
            [[loss] for loss in losses]
        for group in groups:
            if len(group) == 1:
                jobs.append((f"cell={dataset}/{model}/{group[0]}", row_dir / group[0],
                             [row_dir / group[0]]))
            else:
                jobs.append((f"cell={dataset}/{model}/[{','.join(group)}]", row_dir,
                             [row_dir / loss for loss in group]))
    jobs += other_seed_jobs(Path(args.workroot), {s: todo[s] for s in seeds if s in todo},
                            args.vmap_rows)
    # Every run's config is checked before the first trains (and in a dry run): a bad --set
    # value would otherwise stop the sweep at its first cell, or with --keep-going fail every
    # cell one after another.
    import jax
    configs = [paper.get_config(spec + rest) for spec, _, _ in jobs]
    for (spec, _, _), config in zip(jobs, configs):
        try:
            train.validate_config(config, jax.device_count())
        except ValueError as error:
            parser.error(f"{spec + rest}: {error}")
    failed, busy = [], []
    for (spec, workdir, run_dirs), config in zip(jobs, configs):
        if not args.dry_run and all_finished(workdir, config, args.bootstrap):
            # Another sweep over this work root trained and evaluated it since the list above.
            print(f"done  {spec + rest} -> {workdir} (finished by another process meanwhile)",
                  flush=True)
            continue
        print(f"run   {spec + rest} -> {workdir}", flush=True)
        if args.dry_run:
            continue
        try:
            with train.concise_warnings():  # e.g. a damaged checkpoint replaced: one line
                train.train_and_evaluate(config, workdir)
                for run_dir in run_dirs:
                    # the run's eval_checkpoint
                    evaluate.evaluate_run(run_dir, bootstrap_resamples=args.bootstrap)
        except DirectoryInUseError as error:
            # Another process trains it (e.g. a second sweep over this work root, to use
            # another GPU): left to that one, not a failure.
            busy.append(spec)
            print(f"busy  {spec + rest}: {error}", flush=True)
        except Exception as error:  # noqa: BLE001 -- reported below, the sweep exits 1
            if not args.keep_going:
                raise
            failed.append(spec)
            print(f"FAILED {spec + rest}: {type(error).__name__}: {error}", file=sys.stderr,
                  flush=True)
    if busy:
        print(f"{len(busy)} of {len(jobs)} runs were being trained by another process and were "
              f"left to it (a sweep evaluates the runs it trains; rerun this command after it "
              f"to evaluate any it did not): {'; '.join(busy)}", flush=True)
    if failed:
        print(f"{len(failed)} of {len(jobs)} runs failed (see each FAILED line; once its cause "
              f"is fixed, rerun the same command: finished cells are skipped; a diverged run "
              f"diverges again unless its recipe changes): {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def all_finished(workdir, config, bootstrap: int = 0) -> bool:
    """Whether every run of a job (its members, or the run itself) is :func:`finished`."""
    from calib_jax import train

    return all(finished(train.member_dir(workdir, name), member, bootstrap)[0]
               for name, member in train.run_members(config))


if __name__ == "__main__":
    sys.exit(main())
