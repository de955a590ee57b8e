"""Start-up cost of a run's initial state: ``train.create_train_state`` with the variables
computed on the host's CPU (``init_on_host=True``, the default where the state lives on an
accelerator) and on the device (``init_on_host=False``), per model, and whether the two give
the same numbers.

Each (model, mode) runs in a fresh Python process with the persistent compilation cache off
(``JAX_COMPILATION_CACHE_DIR`` unset), so its time is what a run's first start pays: the
compile of the model's ``init`` (and on a GPU the autotuning of its convolutions), the call, and
for the host mode the copy to the device. The parent then compares the two processes' variables
leaf by leaf: elements that differ, and the largest difference. On a CPU both modes take the
same path (the state is initialised where it lives), so the figures agree and the numbers are
equal: the CPU run checks the script (``tests/test_init_bench.py``).

Usage (GPU): python benchmarks/init_bench.py --models resnet50,densenet121 --json out.json
Prints a table and writes JSON (rewritten after each model, so a run cut short keeps its rows).
A model whose child process fails is recorded with its error; the script then exits with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"host": True, "device": False}


def child(model_name: str, mode: str, out: str) -> None:
    """Creates the state once in this (fresh) process, times it, saves the variables."""
    import jax
    import numpy as np

    from calib_jax import models, train

    model = models.get(model_name, 10)
    tx = train.make_optimizer(0.1)
    start = time.perf_counter()
    state = train.create_train_state(jax.random.PRNGKey(0), model, tx,
                                     models.input_shape(model_name, 1),
                                     init_on_host=MODES[mode])
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    leaves = jax.tree_util.tree_leaves_with_path({"params": state.params,
                                                  "batch_stats": state.batch_stats})
    arrays = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
    np.savez(out, **arrays)
    print(json.dumps({"seconds": seconds, "backend": jax.default_backend(),
                      "device": str(jax.devices()[0].device_kind),
                      "variables": int(sum(a.size for a in arrays.values()))}))


def run_child(model_name: str, mode: str, out: Path, timeout_s: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run([sys.executable, __file__, "--child", model_name, mode, str(out)],
                          capture_output=True, text=True, env=env, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{model_name} ({mode}) exited {done.returncode}: "
                           f"{done.stderr.strip()[-600:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(host: Path, device: Path) -> dict:
    import numpy as np
    with np.load(host) as a, np.load(device) as b:
        if sorted(a.files) != sorted(b.files):
            return {"same_structure": False}
        differing, largest, leaves = 0, 0.0, []
        for name in a.files:
            x, y = a[name].astype(np.float64), b[name].astype(np.float64)
            n = int(np.count_nonzero(x != y))
            if n:
                differing += n
                largest = max(largest, float(np.max(np.abs(x - y))))
                leaves.append(name)
        return {"same_structure": True, "elements_differing": differing,
                "max_abs_diff": largest, "leaves_differing": len(leaves),
                "first_leaves_differing": leaves[:5]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50")
    parser.add_argument("--json", default=None)
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds per child process")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "OUT"),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    report = {"python": platform.python_version(), "rows": []}
    status = 0
    print("| model | variables | host init (s) | device init (s) | elements differing "
          "| max abs diff |\n| --- | --- | --- | --- | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            row = {"model": name}
            try:
                files = {mode: Path(tmp) / f"{name}-{mode}.npz" for mode in MODES}
                for mode, path in files.items():
                    result = run_child(name, mode, path, args.timeout)
                    row[f"{mode}_s"] = round(result["seconds"], 3)
                    row.update(backend=result["backend"], device=result["device"],
                               variables=result["variables"])
                row.update(compare(files["host"], files["device"]))
                print(f"| {name} | {row['variables'] / 1e6:.1f} M | {row['host_s']:.2f} | "
                      f"{row['device_s']:.2f} | {row.get('elements_differing', 'structure!')} | "
                      f"{row.get('max_abs_diff', '')} |", flush=True)
                if not row["same_structure"]:
                    status = 1
            except Exception as error:  # noqa: BLE001 -- recorded; the other models still run
                row["error"] = f"{type(error).__name__}: {str(error)[:800]}"
                print(f"| {name} | failed: {row['error']} |", flush=True)
                status = 1
            report["rows"].append(row)
            if args.json:
                tmp_json = Path(args.json + ".tmp")
                tmp_json.write_text(json.dumps(report, indent=2))
                os.replace(tmp_json, args.json)
    return status


if __name__ == "__main__":
    sys.exit(main())
