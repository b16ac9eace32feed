"""scripts/experiment.py --smoke: every phase (pilot, main arms, ablations), the report and the figure, at tiny
sizes, and --report-only rebuilding the same report from the per-run files (docs/experiments.md)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "experiment.py")


def _run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_experiment_smoke(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    _run("--smoke", "--out", out, "--work", work, "--jobs", "2")
    report = (out / "report.md").read_text()
    for arm in ("plain", "plain_efflr", "gpd", "kd", "gpd_static", "wide2x", "static",
                "gpd_lam1", "gpd_lam10", "gpd_r1.5", "gpd_r3", "gpd_nobranch"):
        assert f"| {arm} |" in report, arm
    assert "Pilot gate" in report and "paired diff vs plain" in report
    assert (out / "figures" / "experiment-mnist1d.png").stat().st_size > 10_000
    rec = json.loads((out / "main" / "gpd-s0.json").read_text())
    assert rec["spec"]["kind"] == "gpd" and len(rec["history"]) == 2 and rec["teacher_acc"] is not None
    assert rec["params"] > rec["student_params"]  # the dynamic teacher is wider than the student
    eff = json.loads((out / "main" / "plain_efflr-s0.json").read_text())["spec"]
    assert eff["lr_scale_dense"] == 2.0 and eff["kind"] == "plain"
    # Rebuilt from the files alone: the same report.
    _run("--smoke", "--out", out, "--work", work, "--report-only")
    assert (out / "report.md").read_text() == report
