"""calib_jax.checkpoints: round trip, best tracking, corrupt checkpoints never loaded."""

import json
import shutil

import jax
import pytest

from checkpoint_damage import GARBAGE, damage
from calib_jax import checkpoints, models, train


def small_state(seed=0):
    model = models.get("resnet8", 4)
    return train.create_train_state(jax.random.PRNGKey(seed), model, train.make_optimizer(0.1),
                                    (1, 32, 32, 3))


def test_round_trip_and_best(tmp_path):
    ckpt = checkpoints.RunCheckpoints(tmp_path, keep=2)
    template = small_state(0)
    states = {e: small_state(e) for e in (1, 2, 3)}
    ckpt.save(1, states[1], {"note": "a"}, best_metrics={"val_accuracy": 0.5})
    ckpt.save(2, states[2], {"note": "b"}, best_metrics={"val_accuracy": 0.7})
    ckpt.save(3, states[3], {"note": "c"}, best_metrics={"val_accuracy": 0.6})
    state, meta = ckpt.restore(template)
    assert meta == {"note": "c", "epoch": 3}
    assert checkpoints.tree_equal(checkpoints.state_to_tree(state),
                                  checkpoints.state_to_tree(states[3]))
    best, meta = ckpt.restore(template, "best")
    assert meta["epoch"] == 2
    assert checkpoints.tree_equal(best.params, states[2].params)
    assert sorted(ckpt.latest.all_steps()) == [2, 3]  # keep=2
    # The folder names alone give what the managers list (no manager needed).
    assert checkpoints.saved_epochs(tmp_path) == [2, 3]
    assert checkpoints.saved_epochs(tmp_path, "best") == sorted(ckpt.best.all_steps()) == [2]
    assert checkpoints.saved_epochs(tmp_path / "elsewhere") == []
    with pytest.raises(FileNotFoundError, match="epoch 1"):
        ckpt.restore(template, 1)
    ckpt.close()


def test_nothing_to_restore(tmp_path):
    assert checkpoints.RunCheckpoints(tmp_path).restore(small_state()) is None


def test_corrupt_checkpoint_is_skipped_with_warning(tmp_path):
    ckpt = checkpoints.RunCheckpoints(tmp_path, keep=5)
    ckpt.save(1, small_state(1), {})
    ckpt.save(2, small_state(2), {})
    ckpt.close()
    # Damage every data file of the newest checkpoint.
    damaged = 0
    for path in (tmp_path / "checkpoints" / "2").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "meta" not in str(path):
            path.write_bytes(b"\0garbage" * 3)
            damaged += 1
    assert damaged
    # A half-written checkpoint (Orbax temporary directory) is ignored as well.
    (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-123").mkdir()
    assert checkpoints.saved_epochs(tmp_path) == [1, 2]  # the damaged one is there, not the tmp
    ckpt = checkpoints.RunCheckpoints(tmp_path, keep=5)
    with pytest.warns(RuntimeWarning, match="could not be read"):
        restored = ckpt.restore(small_state(0))
    state, meta = restored
    assert meta["epoch"] == 1
    assert checkpoints.tree_equal(state.params, small_state(1).params)
    ckpt.close()


def test_unfinished_saves_are_deleted_only_when_asked(tmp_path):
    """A process killed while it wrote a checkpoint leaves Orbax's temporary folder (never
    readable, up to a state's size). The trainer (clean_up_unfinished=True, under the run's
    lock) deletes such folders; anyone else leaves them (it could be a save in flight)."""
    ckpt = checkpoints.RunCheckpoints(tmp_path)
    ckpt.save(1, small_state(1), {}, best_metrics={"val_accuracy": 0.5})
    ckpt.close()
    unfinished = [tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234",
                  tmp_path / "best" / "2.orbax-checkpoint-tmp-1234"]
    for folder in unfinished:
        (folder / "state").mkdir(parents=True)
        (folder / "state" / "half_written").write_bytes(b"\0" * 100)

    reader = checkpoints.RunCheckpoints(tmp_path)
    assert reader.restore(small_state(0))[1]["epoch"] == 1
    reader.close()
    assert all(folder.is_dir() for folder in unfinished)

    trainer = checkpoints.RunCheckpoints(tmp_path, clean_up_unfinished=True)
    # (Orbax may delete them in the background until the first save: one saves here.)
    trainer.save(2, small_state(2), {}, best_metrics={"val_accuracy": 0.6})
    trainer.close()
    assert not any(folder.exists() for folder in unfinished)
    assert checkpoints.saved_epochs(tmp_path) == [1, 2]
    assert checkpoints.saved_epochs(tmp_path, "best") == [2]


def moved_aside(workdir):
    folder = workdir / checkpoints.UNREADABLE_FOLDER
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_recomputed_epoch_replaces_its_unreadable_checkpoint(tmp_path):
    """A run resumed from before an unreadable checkpoint saves the recomputed epoch in its
    place (had the old files stayed, a damaged final checkpoint would make every rerun retrain
    the last epochs and still end unfinished); the unreadable files are moved, not deleted.
    A readable checkpoint of an epoch is never replaced."""
    ckpt = checkpoints.RunCheckpoints(tmp_path, keep=5)
    ckpt.save(1, small_state(1), {"note": "1"})
    ckpt.save(2, small_state(2), {"note": "2"}, best_metrics={"val_accuracy": 0.5})
    ckpt.close()
    damage(tmp_path / "checkpoints" / "2")
    damage(tmp_path / "best" / "2")

    ckpt = checkpoints.RunCheckpoints(tmp_path, keep=5)
    # An epoch restore() has not found unreadable is kept as it is (a member one epoch ahead).
    ckpt.save(2, small_state(7), {"note": "other"}, best_metrics={"val_accuracy": 0.5})
    assert moved_aside(tmp_path) == []
    with pytest.warns(RuntimeWarning, match="could not be read"):
        assert ckpt.restore(small_state(0))[1]["epoch"] == 1
    with pytest.warns(RuntimeWarning, match="could not be read"):
        assert ckpt.restore(small_state(0), "best") is None
    with pytest.warns(RuntimeWarning) as record:
        ckpt.save(2, small_state(2), {"note": "again"}, best_metrics={"val_accuracy": 0.5})
    assert [str(w.message).replace(f"{tmp_path}/", "") for w in record] == [
        f"checkpoint {folder}/2: it could not be read; replaced by the recomputed epoch 2; moved to "
        f"unreadable/{folder}-2." for folder in ("checkpoints", "best")]
    ckpt.close()

    ckpt = checkpoints.RunCheckpoints(tmp_path, keep=5)
    for which in ("latest", "best"):
        state, meta = ckpt.restore(small_state(0), which)  # no warning: readable now
        assert meta == {"note": "again", "epoch": 2}
        assert checkpoints.tree_equal(checkpoints.state_to_tree(state),
                                      checkpoints.state_to_tree(small_state(2)))
    ckpt.close()
    assert checkpoints.saved_epochs(tmp_path) == [1, 2]
    assert moved_aside(tmp_path) == ["best-2", "checkpoints-2"]
    # What was moved is the damaged files, as they were.
    assert any(p.read_bytes() == GARBAGE
               for p in (tmp_path / "unreadable" / "checkpoints-2" / "state").rglob("*")
               if p.is_file())


def test_an_unreadable_best_checkpoint_is_read_from_its_epochs_periodic_one(tmp_path):
    """best/<e> damaged, checkpoints/<e> kept: restore("best") returns the periodic one (the
    same state and meta), with a warning naming both; the best stays listed as unreadable,
    so a recomputed epoch still replaces it. Once the periodic one is gone (rotated away, or
    damaged too) there is no best to return."""
    ckpt = checkpoints.RunCheckpoints(tmp_path, keep=2)
    ckpt.save(1, small_state(1), {"note": "1"}, best_metrics={"val_accuracy": 0.4})
    ckpt.save(2, small_state(2), {"note": "2"}, best_metrics={"val_accuracy": 0.5})
    ckpt.save(3, small_state(3), {"note": "3"}, best_metrics={"val_accuracy": 0.3})
    ckpt.close()
    damage(tmp_path / "best" / "2")

    ckpt = checkpoints.RunCheckpoints(tmp_path, keep=2)
    with pytest.warns(RuntimeWarning) as record:
        state, meta = ckpt.restore(small_state(0), "best")
    assert meta == {"note": "2", "epoch": 2}
    assert checkpoints.tree_equal(checkpoints.state_to_tree(state),
                                  checkpoints.state_to_tree(small_state(2)))
    (message,) = [str(w.message).replace(f"{tmp_path}/", "") for w in record]
    assert message.startswith("checkpoint best/2 could not be read (") and message.endswith(
        "); using checkpoints/2, saved from the same state."), message
    with pytest.warns(RuntimeWarning, match="best/2: it could not be read; replaced"):
        ckpt.save(2, small_state(2), {"note": "2"}, best_metrics={"val_accuracy": 0.5})
    assert moved_aside(tmp_path) == ["best-2"]
    ckpt.close()

    damage(tmp_path / "best" / "2")
    damage(tmp_path / "checkpoints" / "2")
    ckpt = checkpoints.RunCheckpoints(tmp_path, keep=2)
    with pytest.warns(RuntimeWarning) as record:
        assert ckpt.restore(small_state(0), "best") is None
    assert [str(w.message).split(" (")[0].replace(f"{tmp_path}/", "") for w in record] == [
        "checkpoint checkpoints/2 could not be read", "checkpoint best/2 could not be read"]
    assert str(record[1].message).endswith("; skipping it.")
    # Both are now listed as unreadable: a recomputed epoch 2 replaces both.
    assert ckpt._unreadable == {"latest": {2}, "best": {2}}
    ckpt.close()
    shutil.rmtree(tmp_path / "checkpoints" / "2")  # rotated away
    ckpt = checkpoints.RunCheckpoints(tmp_path, keep=2)
    with pytest.warns(RuntimeWarning, match="best/2 could not be read"):
        assert ckpt.restore(small_state(0), "best") is None
    ckpt.close()


@pytest.mark.parametrize("part", ["state", "metrics"])
def test_mend_best_rewrites_a_damaged_best_from_its_periodic_twin(tmp_path, part):
    """best/<e> with unreadable arrays (found by reading it) or metrics (moved aside on
    opening), checkpoints/<e> kept: mend_best saves the twin as best/<e> (the same state, meta
    and metric), so the best survives the twin's rotation. A readable best, or one without a
    readable twin, is left as it is (None)."""
    ckpt = checkpoints.RunCheckpoints(tmp_path, keep=3)
    ckpt.save(1, small_state(1), {"best_val_accuracy": 0.4}, best_metrics={"val_accuracy": 0.4})
    ckpt.save(2, small_state(2), {"best_val_accuracy": 0.5}, best_metrics={"val_accuracy": 0.5})
    ckpt.save(3, small_state(3), {"best_val_accuracy": 0.5})
    assert ckpt.mend_best(small_state(0)) is None  # readable: nothing to do, no warning
    ckpt.close()
    damage(tmp_path / "best" / "2", part=part)

    with pytest.warns(RuntimeWarning) as record:
        ckpt = checkpoints.RunCheckpoints(tmp_path, keep=3)
        assert ckpt.mend_best(small_state(0)) == 2
    messages = [str(w.message).replace(f"{tmp_path}/", "") for w in record]
    if part == "state":
        assert len(messages) == 2 and messages[0].startswith("checkpoint best/2 could not be read")
        assert messages[1] == ("checkpoint best/2: it could not be read; replaced by a copy of "
                               "checkpoints/2, saved from the same state; moved to "
                               "unreadable/best-2.")
    else:
        assert messages == [
            "checkpoint best/2: its metrics could not be read; moved to unreadable/best-2.",
            "checkpoint best/2: rewritten from checkpoints/2, saved from the same state."]
    assert ckpt.mend_best(small_state(0)) is None  # mended: nothing left to do
    ckpt.close()
    assert moved_aside(tmp_path) == ["best-2"]

    shutil.rmtree(tmp_path / "checkpoints" / "2")  # the twin rotated away: the best stays
    ckpt = checkpoints.RunCheckpoints(tmp_path, keep=3)
    state, meta = ckpt.restore(small_state(0), "best")  # no warning (the suite makes it an error)
    assert meta == {"best_val_accuracy": 0.5, "epoch": 2}
    assert checkpoints.tree_equal(checkpoints.state_to_tree(state),
                                  checkpoints.state_to_tree(small_state(2)))
    assert ckpt.best.all_steps() == [2]
    assert json.loads((tmp_path / "best" / "2" / "metrics" / "metrics").read_text()) == {
        "val_accuracy": 0.5}
    ckpt.close()

    damage(tmp_path / "best" / "2", part=part)  # no twin now: left for a recomputed epoch
    with pytest.warns(RuntimeWarning, match="best/2"):
        ckpt = checkpoints.RunCheckpoints(tmp_path, keep=3)
        assert ckpt.mend_best(small_state(0)) is None
    ckpt.close()


def test_a_best_checkpoint_with_unreadable_metrics_is_moved_aside_on_opening(tmp_path):
    """Orbax ranks best/ by each checkpoint's metrics file when it opens the folder, and
    raises on one it cannot parse: the run could neither resume nor be evaluated. Such a
    checkpoint is moved to unreadable/ (a second one of the same epoch beside the first).
    One without the file (a layout of another Orbax) is left to Orbax."""
    (tmp_path / "best" / "7").mkdir(parents=True)
    assert not checkpoints._unrankable(tmp_path / "best" / "7")
    (tmp_path / "best" / "7").rmdir()
    for round_ in (1, 2):
        ckpt = checkpoints.RunCheckpoints(tmp_path)
        ckpt.save(1, small_state(1), {}, best_metrics={"val_accuracy": 0.5})
        ckpt.close()
        damage(tmp_path / "best" / "1", part="metrics")
        with pytest.warns(RuntimeWarning, match=r"best/1: its metrics could not be read; "
                                                r"moved to .*unreadable/best-1"):
            ckpt = checkpoints.RunCheckpoints(tmp_path)
        assert ckpt.best.all_steps() == [] and ckpt.restore(small_state(0), "best") is None
        assert ckpt.restore(small_state(0))[1]["epoch"] == 1  # the periodic one is untouched
        ckpt.close()
        assert moved_aside(tmp_path) == ["best-1", "best-1-2"][:round_]


@pytest.mark.parametrize("other", ["optimiser", "classes"])
def test_checkpoint_of_another_configuration_is_refused(tmp_path, other):
    """Another optimiser state's tree, or a head for another number of classes (arrays of
    other shapes): refused, not skipped as damage (a run that skipped them all would start
    afresh and, keeping 3, delete the other configuration's checkpoints)."""
    ckpt = checkpoints.RunCheckpoints(tmp_path)
    ckpt.save(1, small_state(), {})
    ckpt.save(2, small_state(), {})
    ckpt.close()
    # Opened afresh, as a resumed run or an evaluation does: the metadata is read without
    # a save or restore of this manager having named the items' handlers.
    ckpt = checkpoints.RunCheckpoints(tmp_path)
    if other == "optimiser":
        template = train.create_train_state(
            jax.random.PRNGKey(0), models.get("resnet8", 4),
            train.make_optimizer(train.piecewise_lr(0.1, 10)), (1, 32, 32, 3))
    else:
        template = train.create_train_state(jax.random.PRNGKey(0), models.get("resnet8", 10),
                                            train.make_optimizer(0.1), (1, 32, 32, 3))
    with pytest.raises(ValueError, match="different model / optimiser configuration") as refusal:
        ckpt.restore(template)
    if other == "classes":  # named from the metadata, before any array is read
        assert ("['params']['TorchDense_0']['Dense_0']['bias']: checkpoint (4,), template (10,)"
                in str(refusal.value))
    ckpt.close()


def test_async_save_keeps_the_saved_values_when_the_state_is_donated_next(tmp_path):
    """save() returns before the files are written; the caller's next (donating) step
    must not change what lands on disk."""
    ckpt = checkpoints.RunCheckpoints(tmp_path)
    state = small_state(1)
    expected = jax.device_get(checkpoints.state_to_tree(state))
    ckpt.save(1, state, {"note": "a"}, best_metrics={"val_accuracy": 0.5})
    step = jax.jit(lambda s: jax.tree_util.tree_map(lambda x: x * 3 + 1, s), donate_argnums=0)
    params = state.params
    for _ in range(3):
        params = jax.block_until_ready(step(params))
    assert not checkpoints.tree_equal(params, expected["params"])  # the step did change them
    restored, meta = ckpt.restore(small_state(0))  # waits for the write
    assert meta == {"note": "a", "epoch": 1}
    assert checkpoints.tree_equal(checkpoints.state_to_tree(restored), expected)
    best, _ = ckpt.restore(small_state(0), "best")
    assert checkpoints.tree_equal(best.params, expected["params"])
    ckpt.close()
