"""A controlled, paired experiment of GPD against plain training and classic distillation, on MNIST-1D.

    .venv/bin/pip install -e '.[test]'            # mnist1d (its generator runs offline), scipy, matplotlib
    .venv/bin/python scripts/experiment.py        # pilot, main arms, ablations, report (about an hour on 2 cores)
    .venv/bin/python scripts/experiment.py --phase pilot          # only the pilot gate (a few minutes)
    .venv/bin/python scripts/experiment.py --report-only          # tables and figures from the result files
    .venv/bin/python scripts/experiment.py --smoke --out DIR      # about a minute: every code path, tiny sizes
    .venv/bin/python scripts/experiment.py --device cuda --jobs 4 --seeds 16 --ablation-seeds 16   # on a GPU

Data: MNIST-1D (Greydanus, 2020), generated in code by the ``mnist1d`` package's ``make_dataset`` (no download:
``get_dataset`` would download, ``make_dataset`` does not), 30,000 samples with the package's default
transformations and seed 42, split into 20,000 training and 10,000 test samples. Cached in ``--work``.

Student: a 1-D CNN (three convolutions with BatchNorm and ReLU, then a linear layer on the flattened features) at
width 4; plain models at widths 8 and 16 give the pilot gate (does width matter?) and the static teacher (16).

Phases, every run a JSON file under ``--out`` (skipped when present with the same settings, so that an
interrupted run continues where it stopped):

- ``pilot``: plain models at widths 4, 8 and 16, two seeds, on a validation split carved from the training set
  (the last 20% of it); picks the learning rate of every arm as the best of ``--lr-grid`` for the plain width-4
  student on that split (the one shared hyperparameter tuned; tuned on plain, used by every arm).
- ``main``, per seed (each its own initialization, data order and teacher shares; arms of a seed share them):
  ``plain``; ``plain_efflr`` (plain with the dense weights at r x lr and weight decay / r, the student's effective
  rate under GPD at ratio r = 2, per-channel parameters at lr); ``gpd`` (GPDModel + GPDLoss, ratio 2, the default
  branches, lambda 3, KL at T = 1); ``static`` (plain at width 16, the static teacher, trained first); ``kd``
  (the student with CE + KL(static || student)); ``gpd_static`` (GPD with the static teacher's terms on both the
  dynamic teacher and the student); ``wide2x`` (plain at width 8: the width of GPD's teacher without branches).
- ``ablation``: GPD with lambda 1 and 10, ratio 1.5 and 3, and without branches (``--ablation-seeds`` seeds).

Score: the test accuracy of the student extracted after the last epoch (``GPDModel.student_state_dict()`` loaded
into a fresh student), nothing selected on the test set. Report: paired differences against ``plain`` (same seed)
with t-based 95% confidence intervals, the teacher-student gap per epoch (figure), the seconds per run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FULL = {
    "num_samples": 30000, "train_fraction": 2 / 3, "val_fraction": 0.2, "width": 4, "wide": 16, "ratio": 2.0,
    "lam": 3.0, "epochs": 20, "batch_size": 128, "momentum": 0.9, "weight_decay": 5e-4,
    "lr_grid": [0.05, 0.1, 0.2, 0.4], "pilot_seeds": 2, "seeds": 8, "ablation_seeds": 3, "wide2x": False,
}
SMOKE = {**FULL, "wide2x": True, "num_samples": 1000, "epochs": 2, "lr_grid": [0.1], "pilot_seeds": 1, "seeds": 2,
         "ablation_seeds": 1, "pilot_widths": [4, 8]}
PILOT_WIDTHS = [4, 8, 16]
MAIN_ARMS = ["plain", "plain_efflr", "gpd", "gpd_halflr", "kd", "gpd_static", "wide2x", "static"]
ABLATIONS = {  # name: overrides of the gpd arm
    "gpd_nobranch": {"branches": False}, "gpd_lam1": {"lam": 1.0}, "gpd_lam10": {"lam": 10.0},
    "gpd_r1.5": {"ratio": 1.5}, "gpd_r3": {"ratio": 3.0},
}
LABELS = {
    "plain": "plain (student alone)", "plain_efflr": "plain, dense weights at 2x lr (GPD's effective rate)",
    "gpd": "GPD (ratio 2, branches, lambda 3)", "gpd_halflr": "GPD at lr / 2 (student's dense rate = plain's)",
    "kd": "KD from the static wide teacher",
    "gpd_static": "GPD + static teacher", "wide2x": "(plain at width 8)", "static": "(static teacher: plain, width 16)",
    "gpd_lam1": "GPD, lambda 1", "gpd_lam10": "GPD, lambda 10", "gpd_r1.5": "GPD, ratio 1.5",
    "gpd_r3": "GPD, ratio 3", "gpd_nobranch": "GPD, no branches",
}


class Net1d(nn.Module):
    """The student (and the plain wide models): three 1-D convolutions with BatchNorm and ReLU, two of them with
    stride 2, and a linear layer on the flattened features (the position of a feature matters on MNIST-1D)."""

    def __init__(self, width: int = 4, num_classes: int = 10, length: int = 40) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv1d(1, w, 5, padding=2), nn.BatchNorm1d(w), nn.ReLU(),
            nn.Conv1d(w, w, 3, stride=2, padding=1), nn.BatchNorm1d(w), nn.ReLU(),
            nn.Conv1d(w, w, 3, stride=2, padding=1), nn.BatchNorm1d(w), nn.ReLU())
        self.head = nn.Linear(w * ((length + 3) // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


# ---------------------------------------------------------------------------------------------------- data

def make_data(cfg: dict, work: str) -> str:
    """MNIST-1D from its generator (cached as .npz in ``work``); returns the cache path."""
    path = os.path.join(work, f"mnist1d-{cfg['num_samples']}-{cfg['train_fraction']:.4f}.npz")
    if os.path.exists(path):
        return path
    import mnist1d.data

    args = mnist1d.data.get_dataset_args()  # the package's defaults (seed 42); make_dataset never downloads
    args.num_samples = cfg["num_samples"]
    args.train_split = cfg["train_fraction"]
    d = mnist1d.data.make_dataset(args)
    os.makedirs(work, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, x=d["x"].astype(np.float32), y=d["y"].astype(np.int64),
             x_test=d["x_test"].astype(np.float32), y_test=d["y_test"].astype(np.int64))
    os.replace(tmp, path)
    return path


def load_split(path: str, split: str, val_fraction: float):
    """(x_train, y_train, x_eval, y_eval) as tensors (N, 1, 40): ``test`` evaluates on the test set, ``val`` on
    the last ``val_fraction`` of the training set (and trains on the rest)."""
    d = np.load(path)
    x, y = torch.from_numpy(d["x"]).unsqueeze(1), torch.from_numpy(d["y"])
    if split == "test":
        return x, y, torch.from_numpy(d["x_test"]).unsqueeze(1), torch.from_numpy(d["y_test"])
    n = len(y) - int(round(val_fraction * len(y)))
    return x[:n], y[:n], x[n:], y[n:]


# ---------------------------------------------------------------------------------------------------- runs

def run_spec(phase: str, arm: str, seed: int, cfg: dict, lr: float, **over) -> dict:
    """Everything a run's result depends on."""
    kind = {"plain": "plain", "plain_efflr": "plain", "wide2x": "plain", "static": "plain", "kd": "plain"}.get(
        arm, "gpd")
    width = {"wide2x": 2 * cfg["width"], "static": cfg["wide"]}.get(arm, cfg["width"])
    if arm == "gpd_halflr":  # GPD at lr / r: the student's dense weights move at about plain's rate
        lr = lr / cfg["ratio"]
    spec = {"phase": phase, "arm": arm, "seed": seed, "kind": kind, "width": width, "lr": lr,
            "lr_scale_dense": cfg["ratio"] if arm == "plain_efflr" else 1.0,
            "static": arm in ("kd", "gpd_static"), "ratio": cfg["ratio"], "lam": cfg["lam"], "branches": True,
            "split": "val" if phase == "pilot" else "test"}
    for k in ("num_samples", "train_fraction", "val_fraction", "epochs", "batch_size", "momentum", "weight_decay",
              "wide"):
        spec[k] = cfg[k]
    spec.update(over)
    return spec


def result_path(out: str, spec: dict) -> str:
    return os.path.join(out, spec["phase"], f"{spec['arm']}-s{spec['seed']}.json")


def static_path(work: str, spec: dict) -> str:
    keys = ("seed", "wide", "lr", "epochs", "batch_size", "num_samples", "weight_decay")
    tag = "-".join(f"{spec[k]}" for k in keys)
    return os.path.join(work, f"static-logits-{tag}.pt")


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gpd: bool) -> tuple[float, float | None]:
    """Test accuracy of (student, teacher) in eval mode; the teacher's is None for a plain model."""
    model.eval()
    correct_s = correct_t = 0
    with torch.no_grad():
        for i in range(0, len(y), 5000):
            t, s = model(x[i:i + 5000])
            correct_s += (s.argmax(1) == y[i:i + 5000]).sum().item()
            if gpd:
                correct_t += (t.argmax(1) == y[i:i + 5000]).sum().item()
    model.train()
    return correct_s / len(y), (correct_t / len(y) if gpd else None)


def train_run(spec: dict, data_path: str, work: str, device: str) -> dict:
    """One training run with the project's training API: GPDModel (or PlainModel), GPDLoss, make_optimizer,
    lr_at. Returns the record (history per epoch, final accuracy of the extracted student, seconds)."""
    import gpd_surgery
    from gpd_surgery.training import GPDLoss, GPDModel, PlainModel, TrainConfig, lr_at, make_optimizer

    t_start = time.perf_counter()
    seed = spec["seed"]
    xtr, ytr, xev, yev = (t.to(device) for t in load_split(data_path, spec["split"], spec["val_fraction"]))
    static_logits = None
    if spec["static"]:
        p = static_path(work, spec)
        if not os.path.exists(p):  # the static teacher of this seed, trained first (and cached)
            train_run(run_spec("main", "static", seed, spec, spec["lr"], split=spec["split"]),
                      data_path, work, device)
        static_logits = torch.load(p, weights_only=True).to(device)
    # Each seed its own initialization; the arms of one seed share it (the static teacher has its own).
    torch.manual_seed(1000 * seed + (1 if spec["arm"] == "static" else 0))
    student = Net1d(spec["width"])
    if spec["kind"] == "gpd":
        expanded = gpd_surgery.expand(student.eval(), (1, 1, 40), spec["ratio"], seed=seed,
                                      branches="default" if spec["branches"] else ())
        model: nn.Module = GPDModel.from_expanded(expanded)
    else:
        model = PlainModel(student)
    model.to(device).train()
    config = TrainConfig(epochs=spec["epochs"], batch_size=spec["batch_size"], lr=spec["lr"],
                         momentum=spec["momentum"], weight_decay=spec["weight_decay"], lam=spec["lam"],
                         distill="kl", temperature=1.0, plain=spec["kind"] == "plain", seed=seed)
    loss_fn = GPDLoss(config)
    opt = make_optimizer(model, config)
    scale = spec["lr_scale_dense"]  # group 0: the dense (>= 2-d) weights; group 1: 1-d parameters
    opt.param_groups[0]["lr_scale"], opt.param_groups[1]["lr_scale"] = scale, 1.0
    opt.param_groups[0]["weight_decay"] = config.decay / scale  # lr x wd unchanged: the same decay per step
    n, bs = len(ytr), spec["batch_size"]
    per_epoch = n // bs  # drop the last partial batch (BatchNorm)
    total = per_epoch * spec["epochs"]
    gen = torch.Generator().manual_seed(seed)  # the data order, shared by the arms of a seed
    history, step, train_s = [], 0, 0.0
    gpd = spec["kind"] == "gpd"
    for epoch in range(spec["epochs"]):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum = 0.0
        for b in range(per_epoch):
            idx = perm[b * bs:(b + 1) * bs]
            lr = lr_at(step, total, 0, config.base_lr)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            t, s = model(xtr[idx])
            loss, _ = loss_fn(t, s, ytr[idx], None if static_logits is None else static_logits[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            step += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        train_s += time.perf_counter() - t0
        acc_s, acc_t = evaluate(model, xev, yev, gpd)
        history.append({"epoch": epoch + 1, "loss": loss_sum / per_epoch, "student": acc_s, "teacher": acc_t})
    # The score: the extracted student, loaded into a fresh model of the student's architecture.
    final = Net1d(spec["width"]).to(device)
    final.load_state_dict(model.student_state_dict(), strict=True)
    acc, _ = evaluate(PlainModel(final), xev, yev, False)
    if gpd and abs(acc - history[-1]["student"]) > 1e-9:
        raise RuntimeError(f"extracted student {acc} != student view {history[-1]['student']}")
    if spec["arm"] == "static":
        final.eval()
        with torch.no_grad():
            logits = torch.cat([final(xtr[i:i + 5000]) for i in range(0, n, 5000)]).cpu()
        p = static_path(work, spec)
        torch.save(logits, p + ".tmp")
        os.replace(p + ".tmp", p)
    return {"spec": spec, "acc": acc, "teacher_acc": history[-1]["teacher"], "history": history,
            "train_seconds": train_s, "seconds": time.perf_counter() - t_start,
            "params": sum(p.numel() for p in model.parameters()), "student_params": sum(
                p.numel() for p in final.parameters()), "device": device, "torch": torch.__version__}


def job(specs: list[dict], out: str, data_path: str, work: str, device: str, threads: int) -> list[str]:
    """Runs ``specs`` in order in this process (a chain: the static teacher before its students), each written to
    its JSON file as soon as it ends; a run whose file holds the same spec is skipped."""
    torch.set_num_threads(threads)
    done = []
    for spec in specs:
        path = result_path(out, spec)
        if os.path.exists(path):
            with open(path) as f:
                if json.load(f)["spec"] == spec:
                    done.append(f"{path} (kept)")
                    continue
        rec = train_run(spec, data_path, work, device)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f, indent=0)
        os.replace(path + ".tmp", path)
        t = f" / teacher {100 * rec['teacher_acc']:.2f}" if rec["teacher_acc"] is not None else ""
        print(f"{spec['phase']:8} {spec['arm']:12} seed {spec['seed']}: {100 * rec['acc']:.2f}%{t} "
              f"({rec['seconds']:.0f} s)", flush=True)
        done.append(path)
    return done


def run_jobs(chains: list[list[dict]], args, data_path: str) -> None:
    if args.jobs <= 1:
        for c in chains:
            job(c, args.out, data_path, args.work, args.device, args.threads)
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(job, c, args.out, data_path, args.work, args.device, args.threads) for c in chains]
        for f in futures:
            f.result()


# ---------------------------------------------------------------------------------------------------- phases

def load_results(out: str, phase: str) -> dict[tuple[str, int], dict]:
    res = {}
    folder = os.path.join(out, phase)
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    r = json.load(f)
                res[(r["spec"]["arm"], r["spec"]["seed"])] = r
    return res


def pilot_chains(cfg: dict) -> list[list[dict]]:
    chains = []
    for lr in cfg["lr_grid"]:
        for seed in range(100, 100 + cfg["pilot_seeds"]):  # seeds of their own, not the main run's
            for w in cfg.get("pilot_widths", PILOT_WIDTHS):
                chains.append([run_spec("pilot", f"w{w}-lr{lr}", seed, cfg, lr, width=w, kind="plain")])
    return chains


def choose_lr(cfg: dict, out: str) -> float:
    """The learning rate of every arm: the best of the grid for the plain student on the validation split."""
    res = load_results(out, "pilot")
    best = None
    for lr in cfg["lr_grid"]:
        accs = [r["acc"] for (arm, _), r in res.items() if arm == f"w{cfg['width']}-lr{lr}"]
        if len(accs) == cfg["pilot_seeds"] and (best is None or statistics.mean(accs) > best[1]):
            best = (lr, statistics.mean(accs))
    if best is None:
        sys.exit("the pilot has not finished: run --phase pilot first")
    return best[0]


def main_chains(cfg: dict, lr: float) -> list[list[dict]]:
    chains = []
    for seed in range(cfg["seeds"]):
        s = lambda arm: run_spec("main", arm, seed, cfg, lr)  # noqa: E731
        chains += [[s("static"), s("kd"), s("gpd_static")], [s("gpd")], [s("plain"), s("plain_efflr")],
                   [s("gpd_halflr")]] + ([[s("wide2x")]] if cfg.get("wide2x") else [])
    return chains


def ablation_chains(cfg: dict, lr: float) -> list[list[dict]]:
    return [[run_spec("ablation", name, seed, cfg, lr, **over)] for seed in range(cfg["ablation_seeds"])
            for name, over in ABLATIONS.items()]


# ---------------------------------------------------------------------------------------------------- report

def t_ci(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and the t-based 95% confidence interval of paired differences."""
    from scipy import stats

    m = statistics.mean(diffs)
    if len(diffs) < 2:
        return m, float("nan"), float("nan")
    h = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - h, m + h


def report(cfg: dict, out: str, figures: str, lr: float | None) -> str:
    lines = []
    pilot = load_results(out, "pilot")
    if pilot:
        lines += ["### Pilot gate (plain models, validation split carved from the training set)", "",
                  "| width | parameters | " + " | ".join(f"lr {lr_}" for lr_ in cfg["lr_grid"]) + " |",
                  "|---|---|" + "---|" * len(cfg["lr_grid"])]
        for w in cfg.get("pilot_widths", PILOT_WIDTHS):
            cells, params = [], ""
            for lr_ in cfg["lr_grid"]:
                rs = [r for (arm, _), r in pilot.items() if arm == f"w{w}-lr{lr_}"]
                params = rs[0]["student_params"] if rs else params
                per_seed = ", ".join("%.2f" % (100 * r["acc"]) for r in rs)
                cells.append(f"{100 * statistics.mean(r['acc'] for r in rs):.2f} ({per_seed})" if rs else "-")
            lines.append(f"| {w} | {params} | " + " | ".join(cells) + " |")
        lines += ["", f"Chosen learning rate (best plain width-{cfg['width']} student on validation): {lr}", ""]
    for phase in ("main", "ablation"):
        res = load_results(out, phase)
        if not res:
            continue
        base = {s: r for (arm, s), r in res.items() if arm == "plain"}
        if phase == "ablation":  # paired against the main run's plain and gpd of the same seed
            main = load_results(out, "main")
            base = {s: r for (arm, s), r in main.items() if arm == "plain"}
            gpd_main = {s: r for (arm, s), r in main.items() if arm == "gpd"}
        arms = [a for a in (MAIN_ARMS if phase == "main" else ABLATIONS) if any(k[0] == a for k in res)]
        lines += [f"### {'Main arms' if phase == 'main' else 'Ablations'} (test accuracy of the extracted "
                  f"student after epoch {cfg['epochs']}, %)", "",
                  "| arm | n | accuracy, mean ± sd | paired diff vs plain [95% CI] | final teacher | s per run |"
                  + (" diff vs GPD [95% CI] |" if phase == "ablation" else ""),
                  "|---|---|---|---|---|---|" + ("---|" if phase == "ablation" else "")]
        for arm in arms:
            rs = {s: r for (a, s), r in res.items() if a == arm}
            accs = [100 * r["acc"] for r in rs.values()]
            sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
            diffs = [100 * (rs[s]["acc"] - base[s]["acc"]) for s in sorted(rs) if s in base]
            diff = "-"
            if diffs and arm != "plain":
                m, lo, hi = t_ci(diffs)
                diff = f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}] (n={len(diffs)})"
            teach = [100 * r["teacher_acc"] for r in rs.values() if r["teacher_acc"] is not None]
            teach_s = f"{statistics.mean(teach):.2f}" if teach else ""
            secs = statistics.mean(r["seconds"] for r in rs.values())
            row = (f"| {LABELS[arm]} | {len(rs)} | {statistics.mean(accs):.2f} ± {sd:.2f} | {diff} | {teach_s} "
                   f"| {secs:.0f} |")
            if phase == "ablation":
                dg = [100 * (rs[s]["acc"] - gpd_main[s]["acc"]) for s in sorted(rs) if s in gpd_main]
                row += (" {:+.2f} [{:+.2f}, {:+.2f}] |".format(*t_ci(dg)) if dg else " - |")
            lines.append(row)
        lines.append("")
        lines.append("Per seed (accuracy %):")
        lines.append("")
        seeds = sorted({s for _, s in res})
        lines.append("| arm | " + " | ".join(f"s{s}" for s in seeds) + " |")
        lines.append("|---|" + "---|" * len(seeds))
        for arm in arms:
            rs = {s: r for (a, s), r in res.items() if a == arm}
            lines.append(f"| {arm} | " + " | ".join(f"{100 * rs[s]['acc']:.2f}" if s in rs else "-"
                                                   for s in seeds) + " |")
        lines.append("")
    main = load_results(out, "main")
    if main and figures:
        lines += plot(cfg, main, figures)
    return "\n".join(lines)


def plot(cfg: dict, main: dict, figures: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(matplotlib missing: no figures)"]
    os.makedirs(figures, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines = []
    for arm, colour in (("plain", "k"), ("plain_efflr", "grey"), ("gpd", "C0"), ("gpd_halflr", "C1"), ("kd", "C2"),
                        ("gpd_static", "C3"),
                        ("wide2x", "C4"), ("static", "C5")):
        hs = [r["history"] for (a, _), r in main.items() if a == arm]
        if not hs:
            continue
        ep = np.arange(1, len(hs[0]) + 1)
        acc = np.array([[100 * h["student"] for h in hist] for hist in hs])
        axes[0].plot(ep, acc.mean(0), color=colour, label=f"{arm} (n={len(hs)})")
        if arm in ("gpd", "gpd_halflr", "gpd_static"):
            tea = np.array([[100 * h["teacher"] for h in hist] for hist in hs])
            axes[0].plot(ep, tea.mean(0), color=colour, ls="--", label=f"{arm}: dynamic teacher")
            gap = tea - acc
            m, sd = gap.mean(0), gap.std(0, ddof=1) if len(hs) > 1 else np.zeros(len(ep))
            axes[1].plot(ep, m, color=colour, label=f"{arm}: teacher - student")
            axes[1].fill_between(ep, m - sd, m + sd, color=colour, alpha=0.2)
            lines.append(f"{arm}: teacher - student gap by epoch (mean over {len(hs)} seeds): "
                         + ", ".join(f"{e}: {g:+.2f}" for e, g in zip(ep, m)))
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="student accuracy (dashed: dynamic teacher)")
    axes[0].legend(fontsize=7)
    axes[0].set_ylim(bottom=max(0, axes[0].get_ylim()[0]))
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set(xlabel="epoch", ylabel="points", title="dynamic teacher - student (mean ± sd over seeds)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(figures, "experiment-mnist1d.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ["", *lines, "", f"figure: {os.path.relpath(path, ROOT)}"]


# ---------------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["pilot", "main", "ablation", "all"], default="all")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, every code path (about a minute)")
    ap.add_argument("--report-only", action="store_true", help="tables and figures from the result files")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=2, help="processes at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--seeds", type=int, help="seeds of the main arms (0..N-1)")
    ap.add_argument("--ablation-seeds", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--lr", type=float, help="skip the pilot's choice and use this learning rate")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "mnist1d"), help="per-run JSON files")
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "experiment"), help="data and logits cache")
    ap.add_argument("--figures", default=None, help="default: docs/figures (smoke: OUT/figures)")
    args = ap.parse_args()
    cfg = dict(SMOKE if args.smoke else FULL)
    for k in ("seeds", "ablation_seeds", "epochs"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    figures = args.figures or (os.path.join(args.out, "figures") if args.smoke else os.path.join(ROOT, "docs", "figures"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({**cfg, "device": args.device, "jobs": args.jobs, "threads": args.threads}, f, indent=1)
    t0 = time.perf_counter()
    if not args.report_only:
        data_path = make_data(cfg, args.work)
        print(f"data: {data_path} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.phase in ("pilot", "all"):
            run_jobs(pilot_chains(cfg), args, data_path)
        lr = args.lr if args.lr is not None else choose_lr(cfg, args.out)
        if args.phase in ("main", "all"):
            run_jobs(main_chains(cfg, lr), args, data_path)
        if args.phase in ("ablation", "all"):
            run_jobs(ablation_chains(cfg, lr), args, data_path)
    lr = args.lr if args.lr is not None else (choose_lr(cfg, args.out) if load_results(args.out, "pilot") else None)
    text = report(cfg, args.out, figures, lr)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\n{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
