"""`make bench`: expand, extract, verify and the GPD training step, each against its floor, in one run.

Every expand, extract and verify repetition runs in a fresh process (``benchmarks/work.py``), so that
peak memory is the operation's own; the tool and its floor alternate (ABBA), so that a change of load on
the machine hits both alike. Written files are flushed to disk (``sync``) and removed between runs,
outside the timed windows. Training steps run interleaved in one process per model.

Prints a table and writes it, with the machine's description, between the markers of
docs/performance.md (the text around them is kept).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "benchmarks", "work.py")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

EXPAND_MODELS = [("resnet50", "torchvision:resnet50", [1, 3, 224, 224]),
                 ("vit_b_16", "torchvision:vit_b_16", [1, 3, 224, 224])]
TRAIN_MODELS = [  # (label, arch, image side)
    ("resnet18 64x64", "resnet18", 64),
    ("ViT-Ti/16 112x112", "vit_tiny", 112),
]
TARGETS = {"expand_time": 2.0, "expand_peak": 1.5, "extract_time": 1.5, "train_step": 1.15, "startup": 1.3}


def startup(reps: int, load: "Load") -> tuple[Stat, Stat]:
    """Wall time of `gpd --help` and of `python -c "import torch"`, alternating, each a fresh process: the CLI
    must not pay for torch.fx's rules, torchvision or timm before it does any work."""
    gpd = [sys.executable, "-c", "import sys; sys.argv = ['gpd', '--help']; from gpd_surgery.cli import main; main()"]
    plain = [sys.executable, "-c", "import torch"]
    times: dict[str, list[float]] = {"gpd": [], "torch": []}
    for _ in range(reps):
        for name, cmd in (("gpd", gpd), ("torch", plain)):
            load.sample()
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t0)
    return Stat(times["gpd"]), Stat(times["torch"])


# -- machine ---------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pass
    try:
        import torchvision
        tv = torchvision.__version__
    except ImportError:
        tv = "-"
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": mem / 2**30, "torch": torch.__version__, "torchvision": tv,
        "default_threads": torch.get_num_threads(), "python": platform.python_version(), "os": platform.platform(),
    }


class Load:
    """1-minute load averages sampled before every measurement."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    def sample(self) -> None:
        self.samples.append(os.getloadavg()[0])

    def describe(self) -> str:
        s = self.samples or [os.getloadavg()[0]]
        return (f"1-min load average over the run: median {statistics.median(s):.2f}, "
                f"min {min(s):.2f}, max {max(s):.2f} ({len(s)} samples)")


# -- running ---------------------------------------------------------------------------------------------
THREADS = {"n": 1}


# glibc keeps freed memory for reuse instead of returning it to the system (as CUDA's caching allocator does,
# or jemalloc/tcmalloc): a training step then pays no page faults for the tensors it allocates afresh.
CACHING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def work(case: str, args: dict[str, Any], load: Load, timeout: float = 900,
         env: dict[str, str] | None = None) -> dict[str, Any]:
    load.sample()
    args = {**args, "threads": THREADS["n"]}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, WORK, case, json.dumps(args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"benchmark case {case} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["process_wall_s"] = wall
    out["process_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if hasattr(os, "sync"):
        os.sync()  # the next run starts with no dirty pages of this one
    for key in ("out",):
        if key in args and os.path.exists(args[key]):
            os.unlink(args[key])
    return out


@dataclass
class Stat:
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def span(self, fmt: str) -> str:
        return f"{format(min(self.values), fmt)}–{format(max(self.values), fmt)}"

    def cell(self, fmt: str, unit: str = "") -> str:
        return f"{format(self.median, fmt)}{unit} ({self.span(fmt)})"


@dataclass
class Row:
    group: str
    what: str
    tool: Stat
    ref: Stat | None
    fmt: str
    unit: str
    ref_name: str = ""
    target: float | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.ref is None else self.tool.median / self.ref.median

    @property
    def status(self) -> str:
        if self.target is None or self.ratio is None:
            return ""
        return "ok" if self.ratio <= self.target else "MISSED"


def fixtures(args: argparse.Namespace, load: Load) -> dict[str, dict[str, Any]]:
    out = {}
    for name, spec, shape in EXPAND_MODELS:
        d = os.path.join(args.build, name)
        os.makedirs(d, exist_ok=True)
        paths = {"spec": spec, "shape": shape, "ratio": args.ratio, "student": os.path.join(d, "student.safetensors"),
                 "teacher": os.path.join(d, "teacher.safetensors"), "shapes": os.path.join(d, "shapes.json")}
        info = work("prep", paths, load)
        out[name] = {**paths, "summary": info["summary"]}
        print(f"  prepared {name}: {info['summary']['student_params']:,} -> "
              f"{info['summary']['teacher_params']:,} parameters", flush=True)
    return out


def bench_pair(case: str, floor: str, fx: dict[str, Any], reps: int, load: Load,
               extra: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tool_runs, floor_runs = [], []
    d = os.path.dirname(fx["student"])
    for i in range(reps):
        order = [(case, tool_runs), (floor, floor_runs)]
        if i % 2:
            order.reverse()
        for c, runs in order:
            a = {**fx, **(extra or {}), "out": os.path.join(d, f"out-{c}.safetensors")}
            runs.append(work(c, a, load))
    return tool_runs, floor_runs


def phase_stats(runs: list[dict[str, Any]], phases: tuple[str, ...] | list[str]) -> dict[str, Stat]:
    return {ph: stat(runs, "phases", ph) for ph in phases}


def stat(runs: list[dict[str, Any]], key: str, phase: str | None = None) -> Stat:
    if phase is None:
        return Stat([r[key] for r in runs])
    return Stat([r[key].get(phase, 0.0) for r in runs])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="repetitions of expand and extract (each with its floor)")
    p.add_argument("--verify-reps", type=int, default=3)
    p.add_argument("--verify-inputs", type=int, default=1, help="random inputs per verify (the CLI's default is 3)")
    p.add_argument("--train-reps", type=int, default=8, help="timed training steps of each kind (after 2 warm-up)")
    p.add_argument("--amp-reps", type=int, default=4,
                   help="timed training steps under bf16 autocast (gpd train --amp bf16), for information (0: skip)")
    p.add_argument("--caching-malloc-reps", type=int, default=6,
                   help="timed training steps with glibc's malloc keeping freed memory, for information (0: skip)")
    p.add_argument("--durable-reps", type=int, default=3,
                   help="repetitions of `gpd expand --durable` (fsync before naming), for information (0: skip)")
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of every measured process (0: torch's default); see docs/performance.md")
    p.add_argument("--startup-reps", type=int, default=5, help="runs of `gpd --help` and of `import torch`")
    p.add_argument("--only", default="startup,expand,extract,verify,train")
    p.add_argument("--build", default=os.path.join(ROOT, "build", "bench"))
    p.add_argument("--doc", default=os.path.join(ROOT, "docs", "performance.md"),
                   help="document to write the results into ('' to skip)")
    args = p.parse_args()
    only = set(args.only.split(","))
    THREADS["n"] = args.threads
    t_start = time.perf_counter()
    load = Load()
    info = machine()
    print(f"machine: {info['cpu']}, {info['usable_cores']} cores, {info['memory_gib']:.1f} GiB, "
          f"torch {info['torch']}; {args.threads or info['default_threads']} threads per measurement; load {os.getloadavg()[0]:.2f}", flush=True)

    rows: list[Row] = []
    details: dict[str, Any] = {}
    fx = fixtures(args, load) if only & {"expand", "extract", "verify"} else {}

    if "expand" in only:
        for name, fixture in fx.items():
            print(f"  expand {name} x{args.reps} (and its floor)", flush=True)
            tool, floor = bench_pair("expand", "expand_floor", fixture, args.reps, load)
            rows.append(Row("expand", f"{name} time", stat(tool, "seconds"), stat(floor, "seconds"), ".2f", " s",
                            "load + repeat + save_file", TARGETS["expand_time"]))
            rows.append(Row("expand", f"{name} peak RSS", stat(tool, "peak_mib"), stat(floor, "peak_mib"), ".0f",
                            " MiB", "load + repeat + save_file", TARGETS["expand_peak"]))
            details[f"expand {name}"] = {
                "tool": phase_stats(tool, ("model", "load", "plan", "build", "save")),
                "floor": phase_stats(floor, ("load", "build", "save")),
            }
            if args.durable_reps:
                print(f"  expand {name} --durable x{args.durable_reps} (and its floor)", flush=True)
                tool, floor = bench_pair("expand", "expand_floor", fixture, args.durable_reps, load, {"durable": True})
                rows.append(Row("expand", f"{name} time, --durable (info)", stat(tool, "seconds"),
                                stat(floor, "seconds"), ".2f", " s", "load + repeat + save_file, no fsync"))
                details[f"expand {name} --durable"] = {
                    "tool": phase_stats(tool, ("load", "plan", "build", "save", "fsync")),
                    "floor": phase_stats(floor, ("load", "build", "save")),
                }

    if "extract" in only:
        for name, fixture in fx.items():
            print(f"  extract {name} x{args.reps} (and its floor)", flush=True)
            tool, floor = bench_pair("extract", "extract_floor", fixture, args.reps, load)
            rows.append(Row("extract", f"{name} time", stat(tool, "seconds"), stat(floor, "seconds"), ".2f", " s",
                            "load_file + slice + save_file", TARGETS["extract_time"]))
            rows.append(Row("extract", f"{name} peak RSS", stat(tool, "peak_mib"), stat(floor, "peak_mib"), ".0f",
                            " MiB", "load_file + slice + save_file"))
            details[f"extract {name}"] = {
                "tool": phase_stats(tool, ("load", "collapse", "save")),
                "floor": phase_stats(floor, ("load", "collapse", "save")),
            }

    if "verify" in only:
        for name, fixture in fx.items():
            print(f"  verify {name} x{args.verify_reps} ({args.verify_inputs} input)", flush=True)
            runs = [work("verify", {**fixture, "inputs": args.verify_inputs}, load) for _ in range(args.verify_reps)]
            phases = ["load", "trace", "propagate", "analyse", "plan", "teacher", "student_forward", "inside",
                      "forward_ir", "extraction", "other"]
            split = phase_stats(runs, phases)
            groups = {
                "tracing (trace, shape propagation, analysis, plan check)":
                    Stat([sum(r["phases"].get(ph, 0.0) for ph in ("trace", "propagate", "analyse", "plan"))
                          for r in runs]),
                "teacher rebuilds and casts, student copies, the rest":
                    Stat([sum(r["phases"].get(ph, 0.0) for ph in ("teacher", "other")) for r in runs]),
                "forward passes (student, teacher = student, float32 + float64)":
                    Stat([sum(r["phases"].get(ph, 0.0) for ph in ("student_forward", "forward_ir")) for r in runs]),
                "comparison inside (every node, float32 + float64)": split["inside"],
                "extraction check (collapse, view and student forwards)": split["extraction"],
            }
            rows.append(Row("verify", f"{name} total", stat(runs, "seconds"), None, ".2f", " s"))
            rows.append(Row("verify", f"{name} peak RSS", stat(runs, "peak_mib"), None, ".0f", " MiB"))
            for label, s in groups.items():
                rows.append(Row("verify", f"{name} {label}", s, None, ".2f", " s"))
            details[f"verify {name}"] = {"tool": split}

    if "startup" in only:
        print(f"  startup: gpd --help and python -c 'import torch', alternating x{args.startup_reps}", flush=True)
        gpd, torch_only = startup(args.startup_reps, load)
        rows.append(Row("startup", "gpd --help", gpd, torch_only, ".2f", " s", "python -c 'import torch'",
                        TARGETS["startup"]))

    if "train" in only:
        for label, arch, image in TRAIN_MODELS:
            print(f"  train {label} batch 32: 2 warm-up + {args.train_reps} steps of each kind", flush=True)
            a = {"arch": arch, "image": image, "batch": 32, "classes": 100, "ratio": args.ratio,
                 "warmup": 2, "reps": args.train_reps}
            r = work("train", a, load, timeout=1200)
            t = {k: Stat(v) for k, v in r["times"].items()}
            rows.append(Row("train", f"{label} GPD step", t["gpd"], t["separate"], ".3f", " s",
                            "teacher + student steps, separate modules", TARGETS["train_step"]))
            details[f"train {label}"] = {"tool": t, "summary": r["summary"]}
            if args.amp_reps:  # gpd train --amp bf16: the one mixed precision a CPU runs (fp16 is for GPUs)
                print(f"  train {label} under bf16 autocast: 2 warm-up + {args.amp_reps} steps", flush=True)
                r = work("train", {**a, "reps": args.amp_reps, "amp": "bf16", "kinds": ["gpd", "separate"]}, load,
                         timeout=1200)
                t = {k: Stat(v) for k, v in r["times"].items()}
                rows.append(Row("train", f"{label} GPD step, --amp bf16 (info)", t["gpd"], t["separate"], ".3f",
                                " s", "the same, both under bf16 autocast"))
                details[f"train {label}, bf16"] = {"tool": t, "summary": r["summary"]}
            if args.caching_malloc_reps:
                print(f"  train {label} with a caching malloc: 2 warm-up + {args.caching_malloc_reps} steps",
                      flush=True)
                r = work("train", {**a, "reps": args.caching_malloc_reps, "kinds": ["gpd", "separate", "collapse"]},
                         load, timeout=1200, env=CACHING_MALLOC)
                t = {k: Stat(v) for k, v in r["times"].items()}
                rows.append(Row("train", f"{label} GPD step, caching malloc (info)", t["gpd"], t["separate"],
                                ".3f", " s", "the same, same malloc"))
                details[f"train {label}, caching malloc"] = {"tool": t, "summary": r["summary"]}

    elapsed = time.perf_counter() - t_start
    print_table(rows, details, info, load, elapsed)
    if args.doc:
        write_doc(args.doc, rows, details, info, load, elapsed, args)
        print(f"wrote {os.path.relpath(args.doc, ROOT)}")
    return 0 if all(r.status != "MISSED" for r in rows) else 1


# -- output ----------------------------------------------------------------------------------------------
def _ratio(r: Row) -> str:
    return "" if r.ratio is None else f"{r.ratio:.2f}x"


def _target(r: Row) -> str:
    return "" if r.target is None else f"<= {r.target:.2f}x"


def print_table(rows: list[Row], details: dict[str, Any], info: dict[str, Any], load: Load, elapsed: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(150, Console().width))
    t = Table(title=f"gpd-surgery benchmarks: median (min–max); {load.describe()}")
    for col in ("benchmark", "gpd", "floor / reference", "ratio", "target", ""):
        t.add_column(col)
    for r in rows:
        ref = "" if r.ref is None else f"{r.ref.cell(r.fmt, r.unit)}  {r.ref_name}"
        status = {"ok": "[green]ok[/]", "MISSED": "[red]MISSED[/]"}.get(r.status, "")
        t.add_row(f"{r.group}: {r.what}", r.tool.cell(r.fmt, r.unit), ref, _ratio(r), _target(r), status)
    console.print(t)
    d = Table(title="phases (median seconds)")
    d.add_column("run")
    d.add_column("gpd")
    d.add_column("floor")
    for name, parts in details.items():
        tool = ", ".join(f"{k} {v.median:.2f}" for k, v in parts["tool"].items())
        floor = ", ".join(f"{k} {v.median:.2f}" for k, v in parts.get("floor", {}).items())
        d.add_row(name, tool, floor)
    console.print(d)
    console.print(f"{info['cpu']}, {info['usable_cores']} cores, {info['memory_gib']:.1f} GiB, torch {info['torch']}; "
                  f"the run took {elapsed / 60:.1f} min")


def write_doc(path: str, rows: list[Row], details: dict[str, Any], info: dict[str, Any], load: Load, elapsed: float,
              args: argparse.Namespace) -> None:
    lines = [
        BEGIN,
        f"Last run: {time.strftime('%Y-%m-%d %H:%M %Z')}, `make bench` ({elapsed / 60:.1f} min).",
        "",
        f"- Machine: {info['cpu']}, {info['usable_cores']} usable cores ({info['cores']} online), "
        f"{info['memory_gib']:.1f} GiB memory; {info['os']}",
        f"- Python {info['python']}, torch {info['torch']}, torchvision {info['torchvision']}, "
        f"{args.threads or info['default_threads']} intra-op thread(s) per measured process (torch's default here: "
        f"{info['default_threads']})",
        f"- Load: {load.describe()}. The machine is shared: other jobs ran during the measurement.",
        f"- Repetitions: expand and extract {args.reps} each (and as many of each floor, alternating, each in a "
        f"fresh process), `expand --durable` {args.durable_reps}, verify {args.verify_reps} "
        f"({args.verify_inputs} random input), training {args.train_reps} timed steps of each kind after 2 warm-up "
        f"steps, interleaved, with glibc's default malloc, and {args.caching_malloc_reps} of each with glibc's "
        f"malloc keeping freed memory (`{' '.join(f'{k}={v}' for k, v in CACHING_MALLOC.items())}`, see above).",
        "",
        "| benchmark | gpd: median (min–max) | floor / reference: median (min–max) | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = "" if r.ref is None else f"{r.ref.cell(r.fmt, r.unit)} ({r.ref_name})"
        lines.append(f"| {r.group}: {r.what} | {r.tool.cell(r.fmt, r.unit)} | {ref} | {_ratio(r)} | {_target(r)} "
                     f"| {r.status} |")
    lines += ["", "Phases (median seconds):", "", "| run | gpd | floor |", "|---|---|---|"]
    for name, parts in details.items():
        tool = ", ".join(f"{k} {v.median:.2f}" for k, v in parts["tool"].items())
        floor = ", ".join(f"{k} {v.median:.2f}" for k, v in parts.get("floor", {}).items())
        lines.append(f"| {name} | {tool} | {floor} |")
    train = {k: v for k, v in details.items() if k.startswith("train ")}
    if train:
        lines += ["", "Training step components (median seconds; each measured on its own, interleaved with the "
                  "steps above):", "", "| model | student params | teacher params | GPD step | separate steps | "
                  "collapse fwd+bwd | teacher fwd+bwd | student fwd+bwd | paired ratio (median) |",
                  "|---|---|---|---|---|---|---|---|---|"]

        def cell(t: dict[str, Stat], k: str) -> str:
            return f"{t[k].median:.3f}" if k in t else ""

        for name, parts in train.items():
            t, s = parts["tool"], parts["summary"]
            lines.append(f"| {name[len('train '):]} | {s['student_params']:,} | {s['teacher_params']:,} | "
                         f"{cell(t, 'gpd')} | {cell(t, 'separate')} | {cell(t, 'collapse')} | "
                         f"{cell(t, 'teacher_fwd_bwd')} | {cell(t, 'student_fwd_bwd')} | "
                         f"{s['paired_ratio_median']:.3f} |")
    lines.append(END)
    block = "\n".join(lines)
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = "# Performance\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
