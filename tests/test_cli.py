"""code/cave/cli.py: the `cave` command.

Each known failure must be one line on stderr and an exit status (1 a bad
checkpoint, 2 a bad command line), never a traceback. Two run as a user
meets them, through the console script in a subprocess (which also proves
`cave` and `python -m cave` are one command); the rest call cli.main in
this process, the same code without a second start of Python and torch.
"""

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from cave import book, cli
from cave.fundamentals import checkpoints as C
from cave.transformers import llama_training as L

ROOT = book.ROOT
TINY = ["--preset", "tiny", "--quiet", "max_steps=2", "warmup_steps=1",
        "eval_interval=2", "dim=16", "n_heads=2", "n_kv_heads=1",
        "n_layers=1"]


def cave(*argv, timeout=180):
    """Run the console script (python -m cave, the same entry point)."""
    script = Path(sys.executable).parent / "cave"
    command = [str(script)] if script.exists() else \
        [sys.executable, "-m", "cave"]
    result = subprocess.run(command + [str(a) for a in argv],
                            capture_output=True, text=True, cwd=ROOT,
                            timeout=timeout)
    return result.returncode, result.stdout, result.stderr


def run_main(capsys, *argv):
    """The same command, in this process."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cave: error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A tiny run, trained in this process: a folder to copy and damage."""
    out = tmp_path_factory.mktemp("runs") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", "--out", str(out)] + TINY) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def copy_of(run_folder, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_folder, target)
    return target


# --------------------------------------------------------------------------
# the known failures, through the console script
# --------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only "
                    "PyTorch")
@pytest.mark.parametrize("argv", [
    ["sample", "--device", "cuda", "--tokens", "2"],
    ["train", "--device", "cuda"] + TINY,
])
def test_cuda_on_a_cpu_only_pytorch(argv, capsys):
    if argv[0] == "sample":  # as a user meets it
        code, _, stderr = cave(*argv)
    else:
        code, _, stderr = run_main(capsys, *argv)
    assert code == 2
    assert "sees no CUDA GPU" in one_line(stderr)


def test_out_naming_an_existing_file(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    code, _, stderr = run_main(capsys, "train", "--out", file, *TINY)
    assert code == 2 and "expected a folder" in one_line(stderr)
    assert file.read_text() == "mine"


@pytest.mark.parametrize("name, key", [("config.json", "train"),
                                       ("config.json", "model"),
                                       ("state.json", "data"),
                                       ("state.json", "rng")])
def test_resume_from_a_checkpoint_that_lacks_a_key(run_folder, tmp_path,
                                                   name, key, capsys):
    run = copy_of(run_folder, tmp_path)
    path = C.checkpoint_folder(run) / name
    record = json.loads(path.read_text())
    del record[key]
    path.write_text(json.dumps(record))
    code, _, stderr = run_main(capsys, "train", "--out", run, "--resume",
                               "--quiet", "max_steps=4")
    line = one_line(stderr)
    assert code == 1 and name in line and key in line


def test_a_latest_pointer_of_non_text_bytes(run_folder, tmp_path, capsys):
    run = copy_of(run_folder, tmp_path)
    (run / "latest").write_bytes(b"\x80\xff\x00step")
    for argv in (["sample", "--checkpoint", run],
                 ["train", "--out", run, "--resume", "--quiet"]):
        code, _, stderr = run_main(capsys, *argv)
        line = one_line(stderr)
        assert code == 1 and "latest: expected a name like step-" in line


def test_a_garbled_rng_state_names_its_file(run_folder, tmp_path, capsys):
    run = copy_of(run_folder, tmp_path)
    path = C.checkpoint_folder(run) / "state.json"
    state = json.loads(path.read_text())
    state["rng"]["torch"] = state["rng"]["torch"][:100]
    path.write_text(json.dumps(state))
    code, _, stderr = run_main(capsys, "train", "--out", run, "--resume",
                               "--quiet", "max_steps=4")
    line = one_line(stderr)
    assert code == 1 and str(path) in line and "random states" in line


def test_a_tokenizer_that_does_not_fit_the_vocabulary(run_folder,
                                                      tmp_path, capsys):
    run = copy_of(run_folder, tmp_path)
    path = C.checkpoint_folder(run) / "config.json"
    config = json.loads(path.read_text())
    config["tokenizer"]["chars"] = config["tokenizer"]["chars"][:-3]
    path.write_text(json.dumps(config))
    code, _, stderr = run_main(capsys, "sample", "--checkpoint", run,
                               "--tokens", "5")
    line = one_line(stderr)
    assert code == 1 and "config.json" in line and "tokeniser" in line


def test_shipped_model_samples_through_the_console_script():
    code, stdout, stderr = cave("sample", "--prompt", "ROMEO:", "--tokens",
                                "40", "--seed", "1")
    assert code == 0, stderr
    assert stdout.startswith("ROMEO:") and len(stdout) >= 40
    again = subprocess.run([sys.executable, "-m", "cave", "sample",
                            "--prompt", "ROMEO:", "--tokens", "40",
                            "--seed", "1"], capture_output=True, text=True,
                           cwd=ROOT, timeout=180)
    assert again.stdout == stdout  # python -m cave is the same command


def test_run_without_a_full_run_lists_the_chapters_that_have_one(capsys):
    code, _, stderr = run_main(capsys, "run", "essentials", "--full")
    line = one_line(stderr)
    assert code == 2 and "essentials has no full run" in line
    assert "chapters with one:" in line
    assert cli.chapters_with_full_run() == [
        c.stem for c in book.chapters()
        if hasattr(__import__(c.module_name, fromlist=["x"]), "full_run")]


def test_run_prints_what_each_fence_printed(capsys):
    code, stdout, stderr = run_main(capsys, "run", "fundamentals/checkpoints")
    assert code == 0, stderr
    assert "--- fence 1 (line" in stdout
    assert "resumed weights equal the straight run's, bit for bit: True" \
        in stdout


# --------------------------------------------------------------------------
# in this process: the rest of the command line
# --------------------------------------------------------------------------


def test_train_then_sample_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_main(capsys, "train", "--out", out, "--quiet",
                               "--preset", "tiny", "max_steps=4",
                               "warmup_steps=1", "eval_interval=2",
                               "dim=16", "n_heads=2", "n_kv_heads=1",
                               "n_layers=1", "--stop-at", "2")
    assert code == 0
    assert stdout.startswith("val_loss - ") and "tokens 512" in stdout
    code, stdout, _ = run_main(capsys, "train", "--out", out, "--resume",
                               "--quiet")
    assert code == 0 and "tokens 1,024" in stdout
    assert len(stdout.strip().splitlines()) == 1
    code, first, _ = run_main(capsys, "sample", "--checkpoint", out,
                              "--prompt", "KING:", "--tokens", "30",
                              "--top-k", "10", "--seed", "3",
                              "--draft", "none")
    assert code == 0 and first.startswith("KING:")
    _, again, _ = run_main(capsys, "sample", "--checkpoint", out,
                           "--prompt", "KING:", "--tokens", "30",
                           "--top-k", "10", "--seed", "3", "--no-cache")
    assert again == first  # same seed: same text, cache or not


def test_train_record_and_export(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path)
    (tmp_path / "llama_training.json").write_text('{"kept": {"a": 1}}')
    code, _, _ = run_main(capsys, "train", *TINY, "--record", "trial",
                          "--export", tmp_path / "model")
    assert code == 0
    results = json.loads((tmp_path / "llama_training.json").read_text())
    assert results["kept"] == {"a": 1}
    trial = results["trial"]
    assert trial["command"].startswith("cave train --preset tiny")
    assert trial["preset"] == "tiny" and trial["steps"] == 2
    assert {"torch", "cpu_capability", "threads"} <= set(trial)
    model, tokenizer, _ = L.load_model(tmp_path / "model")
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("argv, code", [
    (["train", "nosuchkey=1"], 2),
    (["train", "lr=fast"], 2),
    (["train", "lr=1", "min_lr=2"], 2),
    (["train", "--preset", "huge"], 2),
    (["train", "--resume"], 2),
    (["train", "--quiet", "--bogus"], 2),
    (["sample", "--top-p", "1.5"], 2),
    (["sample", "--tokens", "-1"], 2),
    (["sample", "--prompt", "\u00e9t\u00e9"], 2),
    (["sample", "--device", "tpu"], 2),
    (["fly"], 2),
    ([], 2),
    (["run", "nosuchchapter"], 2),
    (["run", "essentials", "epochs=1"], 2),
    (["run", "essentials", "--full", "oops"], 2),
    (["sample", "--checkpoint", "/no/such/folder"], 1),
    (["train", "--out", "/no/such/folder", "--resume"], 1),
])
def test_errors_are_one_line(argv, code, capsys):
    got, _, stderr = run_main(capsys, *argv)
    assert got == code
    one_line(stderr)


def test_a_corrupt_checkpoint_is_exit_1(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        (folder / name).write_bytes((L.SHIPPED / name).read_bytes()[:100])
    code, _, stderr = run_main(capsys, "sample", "--checkpoint", folder)
    assert code == 1 and "config.json: not valid JSON" in one_line(stderr)
    (folder / "config.json").write_bytes(
        (L.SHIPPED / "config.json").read_bytes())
    code, _, stderr = run_main(capsys, "sample", "--checkpoint", folder)
    assert code == 1 and "not a valid safetensors" in one_line(stderr)


def test_an_unexpected_error_is_still_one_line(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(L, "load_model", broken)
    code, _, stderr = run_main(capsys, "sample")
    assert code == 1 and "CAVE_TRACEBACK=1" in one_line(stderr)
    monkeypatch.setenv("CAVE_TRACEBACK", "1")
    with pytest.raises(KeyError):
        cli.main(["sample"])


@pytest.fixture
def fake_chapter(monkeypatch):
    """A chapter whose module has a full_run that echoes its arguments."""
    module = types.ModuleType("cave_fake_chapter")
    calls = []

    def full_run(device=None, **overrides):
        known = {"epochs", "lr", "flag", "name"}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown overrides {sorted(unknown)}; "
                             f"known: {sorted(known)}")
        calls.append((device, overrides))
        return {"device": str(device), "overrides": overrides}

    module.full_run = full_run
    monkeypatch.setitem(sys.modules, "cave_fake_chapter", module)
    chapter = types.SimpleNamespace(stem="fake", module_name=module.__name__)
    monkeypatch.setattr(cli, "find_chapter", lambda name: chapter)
    return calls


def test_run_full_calls_full_run_and_records(tmp_path, capsys,
                                             monkeypatch, fake_chapter):
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path)
    code, stdout, _ = run_main(capsys, "run", "fake", "epochs=2", "--full",
                               "lr=0.5", "flag=true", "name=abc",
                               "--device", "cpu")
    assert code == 0 and str(tmp_path / "fake.json") in stdout
    assert fake_chapter == [("cpu", {"epochs": 2, "lr": 0.5, "flag": True,
                                     "name": "abc"})]
    record = json.loads((tmp_path / "fake.json").read_text())
    assert record["command"] == ("cave run fake epochs=2 --full lr=0.5 "
                                 "flag=true name=abc --device cpu")
    assert record["overrides"]["epochs"] == 2 and "cpu_capability" in record


def test_run_full_json_writes_elsewhere(tmp_path, capsys, monkeypatch,
                                        fake_chapter):
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path / "results")
    code, _, _ = run_main(capsys, "run", "fake", "--full", "--json",
                          tmp_path / "trial.json")
    assert code == 0
    assert json.loads((tmp_path / "trial.json").read_text())["device"] == \
        "None"
    assert not (tmp_path / "results").exists()
    code, _, stderr = run_main(capsys, "run", "fake", "--full", "bogus=1")
    assert code == 2 and "unknown overrides" in one_line(stderr)


def test_run_full_in_parts_records_each_part_as_an_entry(
        tmp_path, capsys, monkeypatch, fake_chapter):
    module = sys.modules["cave_fake_chapter"]
    module.FULL_RUN_PARTS = ("small", "large")
    inner = module.full_run
    module.full_run = lambda device=None, part=None, **o: {
        "part": part, **inner(device, **o)}
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path)
    code, stdout, _ = run_main(capsys, "run", "fake", "--full", "epochs=1")
    assert code == 0 and stdout.count("recorded part") == 2
    record = json.loads((tmp_path / "fake.json").read_text())
    assert sorted(record) == ["large", "small"]
    assert record["small"]["part"] == "small"
    assert "cpu_capability" in record["large"]
    # one part again: that entry is replaced, the other kept
    code, _, _ = run_main(capsys, "run", "fake", "--full", "part=large",
                          "epochs=5")
    record = json.loads((tmp_path / "fake.json").read_text())
    assert code == 0 and record["small"]["overrides"] == {"epochs": 1}
    assert record["large"]["overrides"] == {"epochs": 5}
    code, _, stderr = run_main(capsys, "run", "fake", "--full", "part=huge")
    assert code == 2 and "parts small, large; got part=huge" in \
        one_line(stderr)


def test_run_full_without_parts_refuses_a_part(capsys, fake_chapter):
    code, _, stderr = run_main(capsys, "run", "fake", "--full", "part=x")
    assert code == 2 and "has no parts" in one_line(stderr)
    assert fake_chapter == []


def test_no_chapter_module_parses_arguments():
    for chapter in book.chapters():
        source = chapter.module.read_text()
        if chapter.stem in ("llama_training", "checkpoints", "data"):
            assert "argparse" not in source, chapter
            assert "def main(" not in source, chapter
