"""Damage a saved checkpoint the way a disk or a copy can: for the tests of unreadable
checkpoints (test_checkpoints, test_train, test_evaluate, test_multihost)."""

from pathlib import Path

GARBAGE = b"\0garbage" * 3


def damage(checkpoint_dir: Path, part: str = "state") -> None:
    """Overwrites every non-empty file of a checkpoint folder's ``part`` (the arrays by
    default; ``"metrics"`` for a best checkpoint's metrics) with garbage."""
    damaged = 0
    for path in (Path(checkpoint_dir) / part).rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(GARBAGE)
            damaged += 1
    assert damaged, f"nothing to damage in {checkpoint_dir}/{part}"
