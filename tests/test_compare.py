"""calib_jax.compare: paired differences of two evaluations' metrics on one test set."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from calib_jax import bootstrap, calibration, compare, evaluate, metrics


@pytest.fixture(scope="module")
def two_evaluations(evaluated_runs, tmp_path_factory):
    """The tiny run's evaluation, and a copy whose test logits are those halved (another
    'model' on the same test set) with its results recomputed from them."""
    run = evaluated_runs / "cifar10" / "resnet50" / "ce"
    base = run / "eval_final"
    other = tmp_path_factory.mktemp("other") / "eval_final"
    shutil.copytree(base, other)
    with np.load(other / evaluate.LOGITS_FILE) as saved:
        arrays = {k: saved[k] for k in saved.files}
    halved = arrays["test_logits"] / 2
    ood_halved = {"synthetic_c": arrays["ood_logits_synthetic_c"] / 2}
    evaluate.write_logits(other / evaluate.LOGITS_FILE, val_logits=arrays["val_logits"],
                          val_labels=arrays["val_labels"], test_logits=halved,
                          test_labels=arrays["test_labels"],
                          temperature=float(arrays["temperature"]), ood_logits=ood_halved)
    results = json.loads((other / "results.json").read_text())
    results["test"] = evaluate.test_report(halved, arrays["test_labels"],
                                           float(arrays["temperature"]), ood_halved)
    (other / "results.json").write_text(json.dumps(results))
    return run, base, other


def test_the_evaluation_saves_its_logits(two_evaluations):
    run, base, _ = two_evaluations
    results = json.loads((base / "results.json").read_text())
    with np.load(base / evaluate.LOGITS_FILE) as saved:
        assert saved["test_logits"].dtype == np.float32 and saved["test_labels"].dtype == np.int32
        assert len(saved["test_logits"]) == len(saved["test_labels"])
        assert float(saved["temperature"]) == results["temperature"]["value"]
        assert saved["ood_logits_synthetic_c"].shape[1] == saved["test_logits"].shape[1]
        # The saved logits give the reported metrics.
        ece = float(metrics.ece(calibration.apply_temperature(saved["test_logits"],
                                                              float(saved["temperature"])),
                                saved["test_labels"]))
    assert ece == pytest.approx(results["test"]["after"]["ece"], abs=1e-6)


def test_differences_are_the_reported_metrics_differences_with_paired_intervals(
        two_evaluations, capsys, tmp_path):
    run, base, other = two_evaluations
    # A run directory resolves to its table evaluation (eval_final).
    report = compare.compare(run, other, num_resamples=50, seed=2)
    assert report["baseline"] == str(base) and report["num_resamples"] == 50
    for tag in ("before", "after"):
        for name in evaluate.METRIC_NAMES:
            row = report[tag][name]
            assert row["difference"] == pytest.approx(row["other"] - row["baseline"], abs=1e-5)
            assert row["basic_95"][0] <= row["basic_95"][1]
            assert 0 <= row["other_lower"] <= 50
    # The intervals are the bootstrap of the difference on the same resamples.
    with np.load(base / evaluate.LOGITS_FILE) as saved:
        z, y = saved["test_logits"], saved["test_labels"]
    direct = bootstrap.bootstrap(lambda a, b, labels: metrics.ece(b, labels) -
                                 metrics.ece(a, labels), z, z / 2, y,
                                 key=jax.random.key(2), num_resamples=50, method="basic")
    np.testing.assert_allclose(report["before"]["ece"]["basic_95"], [direct.low, direct.high],
                               atol=1e-6)
    # The error does not change when logits are halved (same argmax): zero, on every resample.
    assert report["before"]["error"]["difference"] == 0
    assert report["before"]["error"]["basic_95"] == [0.0, 0.0]
    # A run against itself: every difference and interval is 0.
    same = compare.compare(base, base, num_resamples=10)
    assert all(same[t][n]["basic_95"] == [0.0, 0.0] for t in ("before", "after")
               for n in evaluate.METRIC_NAMES)
    out = tmp_path / "cmp.json"
    assert compare.main(["--baseline", str(base), "--other", str(other), "--bootstrap", "20",
                         "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| ece | 1 |" in printed and "| ece | each run's |" in printed
    assert "of 20 |" in printed and json.loads(out.read_text())["num_resamples"] == 20


def test_ood_auroc_differences_resample_the_ood_set_on_its_own(two_evaluations, tmp_path,
                                                               capsys):
    """OOD AUROC rows: the reported AUROCs' difference, with the interval of the two-sample
    bootstrap (test set: the other metrics' resamples; OOD set: its own); an OOD set only one
    evaluation holds, or held with another size, is named as left out."""
    _, base, other = two_evaluations
    report = compare.compare(base, other, num_resamples=40, seed=5)
    assert report["ood_left_out"] == {}
    with np.load(base / evaluate.LOGITS_FILE) as saved:
        z, z_out = saved["test_logits"], saved["ood_logits_synthetic_c"]
        t = float(saved["temperature"])
    direct = bootstrap.bootstrap(compare.auroc_difference, *(
        calibration.apply_temperature(a, t) for a in (z, z / 2, z_out, z_out / 2)),
        key=jax.random.key(5), num_resamples=40, groups=(0, 0, 1, 1), method="basic")
    for tag in ("before", "after"):
        for score in ("entropy", "confidence"):
            row = report[tag]["ood_auroc"]["synthetic_c"][score]
            assert row["difference"] == pytest.approx(row["other"] - row["baseline"], abs=1e-5)
            assert 0 <= row["other_lower"] <= 40
    np.testing.assert_allclose(report["after"]["ood_auroc"]["synthetic_c"]["entropy"]
                               ["basic_95"], [direct.low["entropy"], direct.high["entropy"]],
                               atol=1e-6)
    # A run against itself: exactly 0 on every resample (NumPy ints as counts: a JSON report).
    same = compare.compare(base, base, num_resamples=np.int64(10), seed=np.uint32(1))
    assert json.loads(json.dumps(same))["num_resamples"] == 10
    assert same["before"]["ood_auroc"]["synthetic_c"]["entropy"]["basic_95"] == [0.0, 0.0]
    printed = compare.markdown_comparison(report)
    assert "| OOD AUROC synthetic_c (entropy) | 1 |" in printed
    assert "each OOD set resampled independently" in printed

    smaller, missing = tmp_path / "smaller", tmp_path / "missing"
    with np.load(other / evaluate.LOGITS_FILE) as saved:
        arrays = {k: saved[k] for k in saved.files}
    for target, ood_logits in ((smaller, {"synthetic_c": arrays["ood_logits_synthetic_c"][:7]}),
                               (missing, {})):
        shutil.copytree(other, target)
        evaluate.write_logits(target / evaluate.LOGITS_FILE, val_logits=arrays["val_logits"],
                              val_labels=arrays["val_labels"], test_logits=arrays["test_logits"],
                              test_labels=arrays["test_labels"],
                              temperature=float(arrays["temperature"]), ood_logits=ood_logits)
    n_ood = len(arrays["ood_logits_synthetic_c"])
    left = compare.compare(base, smaller, num_resamples=10)
    assert left["ood_left_out"] == {"synthetic_c": f"{n_ood} and 7 examples: not the same set"}
    assert left["before"]["ood_auroc"] == {}
    assert "OOD set synthetic_c not compared: " in compare.markdown_comparison(left)
    assert compare.compare(base, missing, num_resamples=10)["ood_left_out"] == \
        {"synthetic_c": f"only {base} evaluated it"}


def _with_data_record(source: Path, target: Path, change) -> Path:
    """A copy of evaluation ``source`` at ``target`` whose results.json's ``data`` record
    ``change`` (a function of it) has edited."""
    shutil.copytree(source, target)
    results = json.loads((target / "results.json").read_text())
    change(results["data"])
    (target / "results.json").write_text(json.dumps(results))
    return target


def test_fingerprints_keep_other_examples_from_being_paired(two_evaluations, tmp_path):
    """An OOD set of one name and size but another fingerprint (e.g. CIFAR-10-C from the
    release's files against a generated one) is left out, naming both sources; one an
    evaluation from before fingerprints holds is compared and named as unverified; a test set
    with the same labels but another fingerprint is refused."""
    _, base, other = two_evaluations
    saved = json.loads((base / "results.json").read_text())["data"]
    assert saved["fingerprints"]["ood"]["synthetic_c"].startswith("sha256:")
    assert compare.compare(base, other, num_resamples=10)["ood_unverified"] == {}

    def regenerated(data):
        data["fingerprints"]["ood"]["synthetic_c"] = "sha256:" + "0" * 64
        data["ood_sources"]["synthetic_c"] = "generated elsewhere"

    moved = _with_data_record(other, tmp_path / "regenerated", regenerated)
    report = compare.compare(base, moved, num_resamples=10)
    assert report["before"]["ood_auroc"] == {} and report["after"]["ood_auroc"] == {}
    assert report["ood_left_out"] == {"synthetic_c": (
        f"other examples under one name and size (fingerprints differ; from "
        f"{saved['ood_sources']['synthetic_c']} and generated elsewhere)")}
    assert "OOD set synthetic_c not compared: other examples" in \
        compare.markdown_comparison(report)

    older = _with_data_record(other, tmp_path / "older",
                              lambda data: (data.pop("fingerprints"), data.pop("ood_sources")))
    report = compare.compare(base, older, num_resamples=10)
    assert set(report["before"]["ood_auroc"]) == {"synthetic_c"}
    assert report["ood_unverified"] == {"synthetic_c": (
        f"compared by name and size alone: {older} recorded no fingerprint of it (evaluated "
        f"by an earlier version; evaluate again to check)")}
    assert f"OOD set synthetic_c compared by name and size alone: {older}" in \
        compare.markdown_comparison(report)

    def other_test_images(data):
        data["fingerprints"]["test"] = "sha256:" + "1" * 64

    copy = _with_data_record(other, tmp_path / "copy", other_test_images)
    with pytest.raises(compare.ComparisonRefused, match="different test sets \\(the same "
                                                        "labels, other inputs: fingerprints"):
        compare.compare(base, copy, num_resamples=10)


def test_refusals_say_what_to_do(two_evaluations, tmp_path, capsys):
    run, base, other = two_evaluations
    shorter = tmp_path / "shorter"
    shutil.copytree(other, shorter)
    with np.load(shorter / evaluate.LOGITS_FILE) as saved:
        arrays = {k: saved[k] for k in saved.files}
    flipped = arrays["test_labels"].copy()
    flipped[:3] = (flipped[:3] + 1) % arrays["test_logits"].shape[1]
    evaluate.write_logits(shorter / evaluate.LOGITS_FILE, val_logits=arrays["val_logits"],
                          val_labels=arrays["val_labels"], test_logits=arrays["test_logits"],
                          test_labels=flipped, temperature=1.0, ood_logits={})
    with pytest.raises(compare.ComparisonRefused,
                       match="different test sets \\(labels differing in 3 of"):
        compare.compare(base, shorter, num_resamples=10)
    old = tmp_path / "old"
    shutil.copytree(base, old)
    (old / evaluate.LOGITS_FILE).unlink()
    with pytest.raises(compare.ComparisonRefused,
                       match=f"has no logits.npz .*python -m calib_jax.evaluate --workdir {run}"):
        compare.compare(old, base, num_resamples=10)
    (old / evaluate.LOGITS_FILE).write_bytes((base / evaluate.LOGITS_FILE).read_bytes()[:500])
    with pytest.raises(compare.ComparisonRefused, match="logits.npz cannot be read .*evaluate "
                                                        "the run again"):
        compare.compare(old, base, num_resamples=10)
    np.savez(old / evaluate.LOGITS_FILE, test_logits=np.zeros((2, 3)))
    with pytest.raises(compare.ComparisonRefused, match="no temperature, test_labels in it"):
        compare.compare(old, base, num_resamples=10)
    (tmp_path / "run").mkdir()
    shutil.copy(run / "config.json", tmp_path / "run" / "config.json")
    with pytest.raises(compare.ComparisonRefused, match="has no evaluation at .*eval_final"):
        compare.compare(tmp_path / "run", base, num_resamples=10)
    assert compare.main(["--baseline", str(tmp_path / "nothing"), "--other", str(base)]) == 1
    assert "holds neither an evaluation" in capsys.readouterr().err
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "members.json").write_text('{"members": ["ce"]}')
    with pytest.raises(compare.ComparisonRefused, match="give one of its members"):
        compare.compare(tmp_path / "group", base, num_resamples=10)
    for argv in (["--bootstrap", "1"], ["--seed", "-1"]):
        with pytest.raises(SystemExit):
            compare.main(["--baseline", str(base), "--other", str(base), *argv])
        assert f"`{argv[0]}` must be an int" in capsys.readouterr().err
    with pytest.raises(ValueError, match="`num_resamples` must be an int >= 2"):
        compare.compare(base, base, num_resamples=1)
