"""GPD against plain training of the same student, on offline data, over several seeds.

    .venv/bin/pip install -e '.[test]'                      # scikit-learn (the digits) is in the test extra
    .venv/bin/python scripts/gpd_vs_plain.py --task digits     # 5 seeds, about 5 minutes on 2 cores
    .venv/bin/python scripts/gpd_vs_plain.py --task synthetic  # 3 seeds, about 4 minutes on 2 cores

Tasks:

- ``digits``: scikit-learn's bundled digits (1,797 8x8 grey images, 10 classes), written once as an image
  folder (OUT/digits/{train,val}/CLASS/N.png): a fixed stratified split, --train-per-class images of each
  class for training and the other 797 for validation; trained at 16x16 with padded random crops.
- ``synthetic``: `gpd train`'s built-in task (--data synthetic, 4,000 training and 1,000 validation samples
  of 10 classes at 16x16, the same data for every seed).

For every seed the script runs the same `gpd train` command twice, once with --plain (the student alone,
cross-entropy) and once without (GPD: the student widened x2 with the default branches as the dynamic
teacher, lambda 3, KL at T=1, the student extracted at the end). Both arms share the data, the batch order,
the augmentation, SGD with its cosine schedule, and the epochs. It reports the student's validation accuracy
after the last epoch (no selection on the validation set), and writes OUT/TASK-results.json. Every command is
printed before it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

MODEL = "gpd_surgery.examples:small_cnn"
TASKS = {  # width of small_cnn, epochs, seeds
    "digits": {"width": 8, "epochs": 30, "seeds": [0, 1, 2, 3, 4]},
    "synthetic": {"width": 16, "epochs": 15, "seeds": [0, 1, 2]},
}


def write_digits(root: str, train_per_class: int) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    marker = os.path.join(root, f".split-{train_per_class}")
    if os.path.exists(marker):
        return
    d = load_digits()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(10):
            os.makedirs(os.path.join(root, split, str(c)), exist_ok=True)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c))
        for rank, i in enumerate(idx):
            split = "train" if rank < train_per_class else "val"
            px = (d.images[i] * (255 / 16)).round().astype(np.uint8)
            Image.fromarray(px).save(os.path.join(root, split, str(c), f"{i}.png"))
    open(marker, "w").close()


def command(task: str, mode: str, seed: int, args: argparse.Namespace) -> list[str]:
    gpd = os.path.join(os.path.dirname(sys.executable), "gpd")
    if task == "digits":
        data = ["--data", os.path.join(args.output, "digits"), "--augment", "crop"]
    else:
        data = ["--data", "synthetic", "--synthetic-size", "4000"]
    cmd = [gpd, "train", MODEL, *data, "--model-arg", "num_classes=10", "--model-arg", f"width={args.width}",
           "--image-size", "16", "--epochs", str(args.epochs), "--batch-size", "64", "--seed", str(seed),
           "--device", "cpu", "--json", "--force", "--output-dir", os.path.join(args.output, f"{task}-{mode}-{seed}")]
    return cmd + (["--plain"] if mode == "plain" else [])


def run(cmd: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{shlex.join(cmd)} failed:\n{p.stderr}")
    res = json.loads(p.stdout)
    last = res["history"][-1]["val"]
    return {"student_acc": last["student_acc"], "teacher_acc": last.get("teacher_acc"),
            "seconds": time.perf_counter() - t0, "command": shlex.join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=list(TASKS), default="digits")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--train-per-class", type=int, default=100, help="digits: training images per class")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--output", default="build/exp")
    args = ap.parse_args()
    for k, v in TASKS[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.task == "digits":
        write_digits(os.path.join(args.output, "digits"), args.train_per_class)
    jobs = [(mode, seed) for seed in args.seeds for mode in ("plain", "gpd")]
    cmds = {j: command(args.task, *j, args) for j in jobs}
    for j in jobs:
        print(shlex.join(cmds[j]), flush=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(jobs, pool.map(lambda j: run(cmds[j], 1), jobs)))
    rows = [{"mode": m, "seed": s, **results[(m, s)]} for m, s in jobs]
    for r in rows:
        print(f"seed {r['seed']} {r['mode']:5}: student {100 * r['student_acc']:.2f}%"
              + (f", teacher {100 * r['teacher_acc']:.2f}%" if r["teacher_acc"] is not None else "")
              + f" ({r['seconds']:.0f} s)")
    with open(os.path.join(args.output, f"{args.task}-results.json"), "w") as f:
        json.dump({"args": vars(args), "runs": rows, "seconds": time.perf_counter() - t0}, f, indent=1)
    print(f"\n{args.task}: {len(args.seeds)} seeds, {args.epochs} epochs, small_cnn width {args.width}, "
          f"{time.perf_counter() - t0:.0f} s in all\n")
    print("| training | student accuracy, mean ± std | per seed | time per run |")
    print("|---|---|---|---|")
    for mode in ("plain", "gpd"):
        acc = [100 * r["student_acc"] for r in rows if r["mode"] == mode]
        secs = [r["seconds"] for r in rows if r["mode"] == mode]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"| {mode} | {statistics.mean(acc):.2f} ± {sd:.2f} % | {', '.join(f'{a:.2f}' for a in acc)} "
              f"| {statistics.mean(secs):.0f} s |")
    teacher = [100 * r["teacher_acc"] for r in rows if r["mode"] == "gpd"]
    print(f"| (gpd's dynamic teacher) | {statistics.mean(teacher):.2f} ± "
          f"{statistics.stdev(teacher) if len(teacher) > 1 else 0.0:.2f} % | {', '.join(f'{a:.2f}' for a in teacher)} | |")
    diffs = [100 * (results[("gpd", s)]["student_acc"] - results[("plain", s)]["student_acc"]) for s in args.seeds]
    if len(diffs) > 1:
        print(f"\npaired difference, gpd - plain: {statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} "
              f"points ({', '.join(f'{d:+.2f}' for d in diffs)})")


if __name__ == "__main__":
    main()
