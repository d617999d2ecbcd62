"""docs/transformers/llama_training.md: the training pipeline.

Exact resume is bit-exact on the CPU (torch.equal), with gradient
accumulation, dropout and bf16 autocast on. Checkpoints rotate, load_model
checks what it loads, a tokeniser that does not fit the vocabulary is
refused, and the shipped model loads and writes. (The checkpoint format
itself is tested in test_checkpoints.py, the command line in
test_cli.py, the samplers in test_data.py.)
"""

import json
import os

import pytest
import torch

from cave.fundamentals import checkpoints as C
from cave.fundamentals.data import load_results, shakespeare_split
from cave.transformers import llama_training as L
from cave.transformers.llama import Llama, LlamaConfig

TINY_MODEL = LlamaConfig(vocab_size=65, dim=16, n_layers=1, n_heads=2,
                         n_kv_heads=1, max_seq_len=16, dropout=0.1)


def tiny_train(**kw) -> L.TrainConfig:
    base = dict(batch_size=4, block_size=16, grad_accum=2, max_steps=10,
                warmup_steps=3, lr=3e-3, min_lr=3e-4, eval_interval=5,
                eval_windows=4, checkpoint_interval=100, log_interval=2)
    return L.TrainConfig(**{**base, **kw})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    tokenizer, train_ids, val_ids = shakespeare_split()
    return tokenizer, train_ids[:20_000], val_ids[:600]  # small and fast


# --------------------------------------------------------------------------
# the pieces of the loop
# --------------------------------------------------------------------------


def test_schedule_warms_up_then_follows_the_cosine_to_min_lr():
    c = L.TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    lrs = [L.lr_at(s, c) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.55)  # halfway down the cosine
    assert lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_weight_decay_only_on_matrices():
    model = Llama(TINY_MODEL)
    opt = L.make_optimizer(model, L.TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0
    assert all(p.ndim == 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == \
        len(list(model.parameters()))


def test_config_errors_name_expected_and_got():
    with pytest.raises(ValueError, match="min_lr <= lr, got min_lr=2"):
        L.TrainConfig(lr=1.0, min_lr=2.0)
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        L.TrainConfig(batch_size=0)


# --------------------------------------------------------------------------
# checkpoints and exact resume
# --------------------------------------------------------------------------


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bf16", [True, False])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, data,
                                                         bf16):
    config = tiny_train(bf16=bf16)
    full = L.train(config, TINY_MODEL, tmp_path / "a", data=data)
    L.train(config, TINY_MODEL, tmp_path / "b", stop_at=4, data=data)
    torch.manual_seed(12345)  # disturb the global random state
    resumed = L.train(config, TINY_MODEL, tmp_path / "b", resume=True,
                      data=data)
    a, b = weights(full["model"]), weights(resumed["model"])
    assert resumed["steps"] == full["steps"] == 10
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["val_loss"] == full["val_loss"]
    ckpt_a = C.load_checkpoint(tmp_path / "a")
    ckpt_b = C.load_checkpoint(tmp_path / "b")
    for name, t in ckpt_a["optimizer"].items():
        assert torch.equal(t, ckpt_b["optimizer"][name]), name
    assert ckpt_a["state"]["data"] == ckpt_b["state"]["data"]


def test_resume_without_stop_differs_from_a_fresh_model(tmp_path, data):
    # the test above can fail: a resume that ignored the checkpoint would
    # start from fresh weights and end elsewhere
    config = tiny_train()
    full = L.train(config, TINY_MODEL, tmp_path / "a", data=data)
    short = L.train(tiny_train(max_steps=6), TINY_MODEL, tmp_path / "c",
                    data=data)
    assert not torch.equal(full["model"].output.weight,
                           short["model"].output.weight)


def test_crash_during_save_leaves_the_previous_checkpoint(tmp_path, data,
                                                          monkeypatch):
    out = tmp_path / "run"
    L.train(tiny_train(), TINY_MODEL, out, stop_at=4, data=data)
    before = C.load_checkpoint(out)
    assert before["folder"].name == "step-000004"

    calls = {"n": 0}
    real_fsync = os.fsync

    def crash_on_second_file(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # the first file is written, the second not
            raise OSError("simulated power cut")
        real_fsync(fd)

    monkeypatch.setattr(C.os, "fsync", crash_on_second_file)
    with pytest.raises(OSError, match="simulated power cut"):
        L.train(tiny_train(), TINY_MODEL, out, resume=True, stop_at=6,
                data=data)
    monkeypatch.setattr(C.os, "fsync", real_fsync)

    def crash_on_replace(src, dst):
        raise OSError("simulated crash at the rename")

    monkeypatch.setattr(C.os, "replace", crash_on_replace)
    with pytest.raises(OSError, match="simulated crash"):
        L.train(tiny_train(), TINY_MODEL, out, resume=True, stop_at=6,
                data=data)
    monkeypatch.undo()
    after = C.load_checkpoint(out)
    assert after["folder"] == before["folder"]
    for name, t in before["model"].items():
        assert torch.equal(t, after["model"][name])
    assert after["state"] == before["state"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], \
        "temporary files left behind"


def test_only_the_newest_checkpoints_are_kept(tmp_path, data):
    out = tmp_path / "run"
    L.train(tiny_train(checkpoint_interval=2), TINY_MODEL, out, data=data)
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000010"]
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text()
             .splitlines()]
    assert lines[-1]["event"] == "done" and lines[-1]["steps"] == 10
    assert [x["step"] for x in lines if x["event"] == "val"] == [5, 10]


def test_load_model_checks_names_and_shapes(tmp_path, data):
    out = tmp_path / "run"
    summary = L.train(tiny_train(max_steps=2, warmup_steps=1), TINY_MODEL,
                      out, data=data)
    model, tokenizer, _ = L.load_model(out)
    for name, t in summary["model"].state_dict().items():
        assert torch.equal(model.state_dict()[name], t)
    assert tokenizer.vocab_size == 65
    folder = C.checkpoint_folder(out)
    tensors, _ = C.load_safetensors(folder / "model.safetensors")
    tensors["output.weight"] = tensors["output.weight"][:, :8]
    C.save_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(C.CheckpointError, match=r"output.weight expected"):
        L.load_model(out)


@pytest.mark.parametrize("chars, why", [
    ("abc", "65 distinct characters"),  # too few for the vocabulary
    (None, "distinct characters in sorted order"),  # 65, out of order
    (None, "resume"),  # a tokeniser unlike the training data's
])
def test_a_tokenizer_that_does_not_fit_is_refused(tmp_path, data, chars,
                                                  why):
    out = tmp_path / "run"
    L.train(tiny_train(max_steps=2, warmup_steps=1), TINY_MODEL, out,
            data=data)
    path = C.checkpoint_folder(out) / "config.json"
    config = json.loads(path.read_text())
    real = config["tokenizer"]["chars"]
    if why == "resume":  # same size and order, other characters
        config["tokenizer"]["chars"] = "".join(sorted(set(real[:-1] + "~")))
        path.write_text(json.dumps(config))
        with pytest.raises(C.CheckpointError, match="tokeniser differs"):
            L.train(tiny_train(max_steps=4, warmup_steps=1), TINY_MODEL,
                    out, resume=True, data=data)
        return
    config["tokenizer"]["chars"] = chars or real[::-1]
    path.write_text(json.dumps(config))
    with pytest.raises(C.CheckpointError, match=why) as err:
        L.load_model(out)
    assert "config.json" in str(err.value)


@pytest.mark.parametrize("damage, key", [
    ("config", "train"), ("config", "model"), ("state", "data"),
    ("state", "step"), ("state", "rng"), ("state", "param_groups")])
def test_resume_refuses_a_checkpoint_that_lacks_a_key(tmp_path, data,
                                                       damage, key):
    out = tmp_path / "run"
    L.train(tiny_train(max_steps=2, warmup_steps=1), TINY_MODEL, out,
            data=data)
    path = C.checkpoint_folder(out) / f"{damage}.json"
    record = json.loads(path.read_text())
    del record[key]
    path.write_text(json.dumps(record))
    with pytest.raises(C.CheckpointError, match=key) as err:
        if damage == "config" and key == "train":
            L.saved_configs(out)
        else:
            L.train(tiny_train(max_steps=4, warmup_steps=1), TINY_MODEL,
                    out, resume=True, data=data)
    assert path.name in str(err.value)


def test_evaluate_restores_each_submodule_mode(data):
    _, _, val_ids = data
    model = Llama(TINY_MODEL)
    model.train()
    model.layers[0].eval()  # a mixed state, as a user might leave it
    L.evaluate(model, val_ids, 16, max_windows=2, bf16=False)
    assert model.training and not model.layers[0].training


# --------------------------------------------------------------------------
# the shipped model
# --------------------------------------------------------------------------


def test_shipped_checkpoint_is_small_and_recorded_under_1_55():
    size = (L.SHIPPED / "model.safetensors").stat().st_size
    assert size <= 20_000_000
    record = load_results("llama_training")["shakespeare"]
    assert record["val_loss"] <= 1.55
    assert record["command"].startswith("cave train --preset shakespeare")
    model, tokenizer, config = L.load_model()
    assert config["model"] == record["model"]
    _, _, val_ids = shakespeare_split()
    loss = L.evaluate(model, val_ids[:2049], 256, bf16=False)
    assert loss < 1.8  # eight windows: near the recorded full-set value
