"""The commands as users type them: verify TEACHER alone, default outputs, .pt files and weight files that are
not what gpd expects, module specs in the current directory, plan == expand with branches, progress, -h,
--version, and the exit codes under --debug."""
import collections
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file

import gpd_surgery
from conftest import MODEL, randomize, gpd as run_gpd
from gpd_surgery.cli import common as cli
from gpd_surgery.examples import small_cnn

SHAPE = ("--input-shape", "1,3,16,16")
pytestmark = pytest.mark.usefixtures("one_thread")


def gpd(*args):
    return run_gpd(*args, catch_exceptions=False)


def plan_of(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["gpd_plan"])


def trained_state(seed=3):
    """Weights that differ from the seeded random student, so that a student rebuilt without them fails."""
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in randomize(small_cnn(), seed=seed).state_dict().items()}


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    """A teacher expanded with --weights given as a relative path (from its folder)."""
    d = tmp_path_factory.mktemp("ux")
    save_file(trained_state(), str(d / "w.safetensors"))
    here = os.getcwd()
    os.chdir(d)
    try:
        r = gpd("expand", MODEL, "--weights", "w.safetensors", *SHAPE, "--json")
    finally:
        os.chdir(here)
    assert r.exit_code == 0, r.output
    return d, json.loads(r.output)


# -- 2. verify TEACHER ------------------------------------------------------------------------------
def test_the_plan_records_where_the_weights_are_and_their_checksum(expanded):
    d, summary = expanded
    assert summary["output"] == "w.teacher.safetensors"  # the default name, next to the weights
    src = plan_of(d / "w.teacher.safetensors")["source"]
    digest = hashlib.sha256((d / "w.safetensors").read_bytes()).hexdigest()
    assert src["weights"] == "w.safetensors" and src["weights_sha256"] == digest
    assert src["weights_path"] == str(d / "w.safetensors")  # the relative path, resolved at expand time
    assert src["model"] == MODEL and src["input_shape"] == [1, 3, 16, 16]


def test_verify_teacher_alone_takes_model_and_weights_from_the_plan(expanded, tmp_path, monkeypatch):
    d, _ = expanded
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded path is absolute
    r = gpd("verify", d / "w.teacher.safetensors", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["passed"] and rep["model"] == MODEL and rep["weights"] == str(d / "w.safetensors")
    # MODEL TEACHER still works, and --weights overrides the plan's.
    r = gpd("verify", MODEL, d / "w.teacher.safetensors", "--weights", d / "w.safetensors", "--device", "cpu")
    assert r.exit_code == 0, r.output


def test_verify_finds_moved_weights_next_to_the_teacher_and_refuses_changed_ones(expanded, tmp_path):
    d, _ = expanded
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(d / "w.teacher.safetensors", moved / "t.safetensors")
    plan = plan_of(moved / "t.safetensors")
    plan_path = plan["source"]["weights_path"]
    # Missing everywhere: exit 2, naming the file and --weights.
    os.rename(plan_path, tmp_path / "away.safetensors")
    try:
        r = gpd("verify", moved / "t.safetensors", "--device", "cpu")
        assert r.exit_code == 2 and plan_path in r.output and "--weights" in r.output and "missing" in r.output
        # The same file next to the teacher is found by its name and checked by its SHA-256.
        shutil.copy(tmp_path / "away.safetensors", moved / "w.safetensors")
        r = gpd("verify", moved / "t.safetensors", "--device", "cpu", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["weights"] == str(moved / "w.safetensors")
        # Other weights under the recorded name: refused, not verified against the wrong student.
        save_file(trained_state(seed=4), str(moved / "w.safetensors"))
        r = gpd("verify", moved / "t.safetensors", "--device", "cpu")
        assert r.exit_code == 2 and "changed" in r.output and "--weights" in r.output
        # Passing them explicitly runs the check, which fails, and a note says why.
        r = gpd("verify", moved / "t.safetensors", "--weights", moved / "w.safetensors", "--device", "cpu")
        assert r.exit_code == 1 and "SHA-256 differs" in r.output
    finally:
        os.rename(tmp_path / "away.safetensors", plan_path)


def test_verify_alone_needs_a_model_spec_in_the_plan(tmp_path):
    torch.manual_seed(0)
    model = small_cnn().eval()
    gpd_surgery.expand(model, (1, 3, 16, 16)).save(str(tmp_path / "t.safetensors"))  # from Python: no spec
    r = gpd("verify", tmp_path / "t.safetensors", "--device", "cpu")
    assert r.exit_code == 2 and "records no MODEL spec" in r.output and "gpd verify MODEL" in r.output
    assert gpd("verify", MODEL, tmp_path / "t.safetensors", "--device", "cpu").exit_code == 0
    # A spec alone (the teacher forgotten) and no argument at all are usage errors.
    r = gpd("verify", "torchvision:resnet18")
    assert r.exit_code == 2 and "no TEACHER file follows" in r.output
    r = run_gpd("verify")
    assert r.exit_code == 2 and "TEACHER" in r.output


def test_verify_refuses_a_teacher_whose_plan_names_weights_without_a_checksum(tmp_path):
    torch.manual_seed(0)
    res = gpd_surgery.expand(small_cnn().eval(), (1, 3, 16, 16), source={"model": MODEL, "weights": "w.pt"})
    res.save(str(tmp_path / "t.safetensors"))  # as teachers written before plans recorded the checksum
    r = gpd("verify", tmp_path / "t.safetensors", "--device", "cpu")
    assert r.exit_code == 2 and "w.pt" in r.output and "--weights" in r.output


def test_train_takes_the_model_from_the_teacher_file(expanded, tmp_path):
    d, _ = expanded
    common = ("--data", "synthetic", "--synthetic-size", 32, "--image-size", 16, "--batch-size", 16, "--epochs", 1,
              "--device", "cpu", "--json")
    r = gpd("train", "--teacher", d / "w.teacher.safetensors", *common, "--output-dir", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["model"] == MODEL
    r = gpd("train", *common, "--output-dir", tmp_path / "run2")
    assert r.exit_code == 2 and "pass MODEL" in r.output


# -- 3. default outputs -----------------------------------------------------------------------------
def test_default_outputs_are_named_after_the_input_and_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = gpd("expand", MODEL, *SHAPE)
    assert r.exit_code == 0, r.output
    assert "small_cnn.teacher.safetensors" in r.output and (tmp_path / "small_cnn.teacher.safetensors").is_file()
    r = gpd("expand", MODEL, *SHAPE)
    assert r.exit_code == 2 and "exists" in r.output and "--force" in r.output
    r = gpd("extract", "small_cnn.teacher.safetensors", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["output"] == "small_cnn.student.safetensors"
    assert (tmp_path / "small_cnn.student.safetensors").is_file()
    assert gpd("extract", "small_cnn.teacher.safetensors").exit_code == 2
    assert gpd("extract", "small_cnn.teacher.safetensors", "--force").exit_code == 0
    # Next to the weights, in their folder; a teacher not named *.teacher.* gets .student added.
    (tmp_path / "sub").mkdir()
    save_file(trained_state(), "sub/w.safetensors")
    assert gpd("expand", MODEL, "--weights", "sub/w.safetensors", *SHAPE).exit_code == 0
    assert (tmp_path / "sub" / "w.teacher.safetensors").is_file()
    os.rename("sub/w.teacher.safetensors", "sub/t.safetensors")
    assert gpd("extract", "sub/t.safetensors").exit_code == 0
    assert (tmp_path / "sub" / "t.student.safetensors").is_file()


@pytest.mark.parametrize("inputs,spec,kind,want", [
    ([None], "torchvision:resnet18", "teacher", "resnet18.teacher.safetensors"),
    ([None], "timm:vit_tiny_patch16_224.augreg_in21k", "teacher", "vit_tiny_patch16_224.augreg_in21k.teacher.safetensors"),
    ([None, "models/net.pt"], "models/net.pt", "teacher", "models/net.teacher.safetensors"),
    (["ckpt/e10.pt", None], "torchvision:resnet18", "teacher", "ckpt/e10.teacher.safetensors"),
    (["a/r18.teacher.safetensors"], None, "student", "a/r18.student.safetensors"),
    (["w.teacher.safetensors"], MODEL, "teacher", "w.teacher.teacher.safetensors"),  # never the input itself
])
def test_default_output_names(inputs, spec, kind, want):
    assert cli.default_output(inputs, spec, kind) == want


# -- 4. .pt files and weights that are not plain state dicts ----------------------------------------
def _saved_in_main(path):
    """A model pickled by a script whose class lives in its __main__, as users' training scripts do."""
    code = ("import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            "        self.l = torch.nn.Linear(2, 2)\n    def forward(self, x):\n        return self.l(x)\n"
            f"torch.save(Net(), {str(path)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_state_dict_given_as_model_says_to_use_weights(tmp_path):
    torch.save(small_cnn().state_dict(), tmp_path / "model.pt")
    r = gpd("expand", tmp_path / "model.pt", *SHAPE, "-o", tmp_path / "t.safetensors")
    assert r.exit_code == 2 and "state dict" in r.output and "--weights" in r.output
    assert "pickled module" not in r.output and "OrderedDict" not in r.output


def test_a_pickled_class_from_main_is_explained(tmp_path):
    _saved_in_main(tmp_path / "net.pt")
    r = gpd("expand", tmp_path / "net.pt", "--trust-pickle", "-o", tmp_path / "t.safetensors")
    assert r.exit_code == 2 and "__main__" in r.output and "module:factory" in r.output
    assert "Can't get attribute" not in r.output
    # Given as --weights: one line of our own (no escape codes), saying what it is and what would load it.
    r = gpd("plan", MODEL, *SHAPE, "--weights", tmp_path / "net.pt")
    assert r.exit_code == 2 and "__main__.Net" in r.output and "--trust-pickle" in r.output
    assert "\x1b" not in r.output and "\\x1b" not in r.output and r.output.count("\n") == 1


def test_weights_from_a_trusted_pickled_model(tmp_path):
    torch.save(randomize(small_cnn(), seed=5), tmp_path / "whole.pt")  # class importable: gpd_surgery.examples
    assert gpd("plan", MODEL, *SHAPE, "--weights", tmp_path / "whole.pt").exit_code == 2
    r = gpd("expand", MODEL, *SHAPE, "--weights", tmp_path / "whole.pt", "--trust-pickle",
            "-o", tmp_path / "t.safetensors")
    assert r.exit_code == 0, r.output
    r = gpd("verify", tmp_path / "t.safetensors", "--trust-pickle", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output


def test_ddp_prefixes_are_stripped_with_a_note(tmp_path):
    state = trained_state()
    torch.save(collections.OrderedDict((f"module.{k}", v) for k, v in state.items()), tmp_path / "ddp.pt")
    r = gpd("expand", MODEL, *SHAPE, "--weights", tmp_path / "ddp.pt", "-o", tmp_path / "t.safetensors")
    assert r.exit_code == 0, r.output
    assert "'module.'" in r.output and "stripped" in r.output
    r = gpd("verify", tmp_path / "t.safetensors", "--device", "cpu", "--json")
    assert r.exit_code == 0 and json.loads(r.output.splitlines()[-1])["passed"]


@pytest.mark.parametrize("kind", ["complex", "sparse", "junk"])
def test_weights_that_would_load_wrongly_are_refused(tmp_path, kind):
    state = dict(small_cnn().state_dict())
    w = state["stem.0.weight"]
    path = tmp_path / "w.pt"
    if kind == "junk":
        path.write_bytes(b"not a torch file at all")
    else:
        state["stem.0.weight"] = w.to(torch.complex64) if kind == "complex" else w.to_sparse()
        torch.save(state, path)
    r = gpd("plan", MODEL, *SHAPE, "--weights", path)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output  # one line, no warnings
    want = {"complex": "stem.0.weight is complex", "sparse": "stem.0.weight is sparse",
            "junk": "neither a safetensors file nor a torch.save file"}[kind]
    assert want in r.output


# -- 5. module specs in the current directory -------------------------------------------------------
def _console_script():
    return os.path.join(os.path.dirname(sys.executable), "gpd")


def test_a_module_in_the_current_directory_needs_no_pythonpath(tmp_path):
    (tmp_path / "mynets.py").write_text("from gpd_surgery.examples import small_cnn as net\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([_console_script(), "plan", "mynets:net", *SHAPE, "--json"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "mynets:net"


# -- 6. plan previews the exact expand --------------------------------------------------------------
def test_plan_counts_branches_as_expand_writes_them(tmp_path):
    opts = ("--ratio", "1.5", "--branches", "default", "--seed", 7, "--equal-shares", *SHAPE, "--json")
    planned = json.loads(gpd("plan", MODEL, *opts).output)
    written = json.loads(gpd("expand", MODEL, *opts, "-o", tmp_path / "t.safetensors").output)
    for key in ("teacher_params", "teacher_bytes", "student_params", "spaces_expanded"):
        assert planned[key] == written[key], key
    plain = json.loads(gpd("plan", MODEL, "--ratio", "1.5", *SHAPE, "--json").output)
    assert planned["teacher_params"] > plain["teacher_params"] and planned["branched_weights"] > 0
    assert plan_of(tmp_path / "t.safetensors")["seed"] == 7


# -- 7. progress on stderr --------------------------------------------------------------------------
@pytest.fixture
def terminal(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=stream, force_terminal=True, width=120))
    return stream


def test_progress_shows_each_step_on_a_terminal(terminal, tmp_path):
    r = gpd("expand", MODEL, *SHAPE, "-o", tmp_path / "t.safetensors")
    assert r.exit_code == 0, r.output
    shown = terminal.getvalue()
    for label in ("loading gpd_surgery.examples:small_cnn", "capturing and planning x2", "building the teacher",
                  "writing"):
        assert label in shown, label
    assert "loading" not in r.output  # the table on stdout is unchanged
    terminal.truncate(0)
    r = gpd("verify", tmp_path / "t.safetensors", "--device", "cpu")
    shown = terminal.getvalue()
    assert r.exit_code == 0 and "reading" in shown and "teacher = student (cpu float64)" in shown
    terminal.truncate(0)
    r = gpd("extract", tmp_path / "t.safetensors", "-o", tmp_path / "s.safetensors")
    assert r.exit_code == 0 and "collapsing" in terminal.getvalue()


def test_no_progress_with_json_or_off_a_terminal(terminal, tmp_path):
    r = gpd("expand", MODEL, *SHAPE, "-o", tmp_path / "t.safetensors", "--json")
    assert r.exit_code == 0 and terminal.getvalue() == ""
    json.loads(r.output)


def test_progress_is_quiet_off_a_terminal(tmp_path):
    r = gpd("expand", MODEL, *SHAPE, "-o", tmp_path / "t.safetensors")  # CliRunner's stderr is no terminal
    assert r.exit_code == 0 and "capturing and planning" not in r.output


# -- 8. -h and --version ----------------------------------------------------------------------------
def test_h_is_help_everywhere_and_version_prints():
    r = gpd("-h")
    assert r.exit_code == 0 and "Usage" in r.output and "expand" in r.output
    for cmd in ("expand", "verify", "extract", "plan", "inspect", "train"):
        r = gpd(cmd, "-h")
        assert r.exit_code == 0 and "Usage" in r.output and f" {cmd} [OPTIONS]" in r.output, cmd
    r = gpd("--version")
    assert r.exit_code == 0 and r.output.strip() == f"gpd-surgery {gpd_surgery.__version__}"


# -- --debug keeps the exit codes -------------------------------------------------------------------
def test_debug_shows_the_traceback_and_keeps_exit_2_and_3(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpd", "inspect", str(tmp_path / "missing"), "--debug"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "GPDError: file" in err

    def boom(*a, **k):
        raise ValueError("internal: a bug")

    monkeypatch.setattr(gpd_surgery.api, "plan_expansion", boom)
    monkeypatch.setattr(sys, "argv", ["gpd", "plan", MODEL, *SHAPE, "--debug"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 3 and "ValueError: internal: a bug" in capsys.readouterr().err
