"""The distributed chapter: data parallelism equal to
DistributedDataParallel and to one process, ZeRO's three stages equal to
fully_shard (FSDP2) and to one process with the memory the stages
predict, tensor-parallel layers equal to LLaMA's, the sampler equal to
DistributedSampler, `cave train` on two ranks equal to one process and
resumable on another number of ranks.

Every test that starts ranks does it through `launch`: a free port found
at run time, forked processes, a timeout on the group and on the ranks,
and a RuntimeError naming the rank instead of a hang. Each launch runs
several checks, to keep process groups few."""

import json
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from cave import cli
from cave.fundamentals.checkpoints import load_checkpoint
from cave.fundamentals.data import load_results, shakespeare_split
from cave.scale.distributed import (
    SCHEMES, WRAPPERS, Comm, DataParallel, ParallelAttention,
    ParallelFeedForward, ZeroAdamW, launch, nbytes, piece, ring_bytes,
    shard_indices, step_bytes, tensor_parallel_bytes, train_data_parallel,
    train_scheme, wrap)
from cave.transformers.llama import (Attention, FeedForward, LlamaConfig,
                                     rope_angles)
from cave.transformers.llama_training import PRESETS, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# float32 over three AdamW steps: the same sums taken in another order
# (two halves of the batch, then their mean) move the last bits of the
# gradients, and Adam's division by sqrt(v) can amplify a relative 1e-7
# to about 1e-6 of a step of lr = 1e-2
TOL = dict(atol=2e-5, rtol=1e-4)
EXACT = dict(atol=0, rtol=0)


def loss_fn(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def problem(widths, batch, steps, seed):
    """A tanh MLP of the given widths and `steps` whole batches."""
    def make_model():
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        return nn.Sequential(*layers[:-1])

    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(batch, widths[0], generator=g),
                torch.randn(batch, widths[-1], generator=g))
               for _ in range(steps)]
    return make_model, batches


# even shapes (no padding), then odd ones: 7 x 33 weights and 33-element
# biases cut into unequal pieces, the last rank's part padding
PROBLEMS = [problem((16, 64, 64, 4), 16, 3, 0),
            problem((7, 33, 5), 12, 4, 1)]


def every_scheme(rank, world_size):
    """On each rank: every scheme on both problems, and the messages of
    bad input that need a process group."""
    runs = [{s: train_scheme(rank, world_size, s, make_model, batches,
                             loss_fn) for s in WRAPPERS[1:]}
            for make_model, batches in PROBLEMS]
    comm, errors = Comm(), []
    config = LlamaConfig(vocab_size=8, dim=24, n_layers=1, n_heads=3,
                         n_kv_heads=3)
    for bad in (lambda: ZeroAdamW(nn.Linear(2, 2).parameters(), comm, 3),
                lambda: ParallelAttention(Attention(config), comm),
                lambda: wrap(nn.Linear(2, 2), comm, "ZeRO-4", 0.1)):
        with pytest.raises(ValueError) as err:
            bad()
        errors.append(str(err.value))
    return runs, errors


@pytest.fixture(scope="module")
def schemes():
    ranks = launch(every_scheme, 2, timeout=120)
    one = [launch(train_scheme, 1, "one process", make_model, batches,
                  loss_fn, timeout=60)[0]
           for make_model, batches in PROBLEMS]
    return ranks, one


@pytest.mark.parametrize("case", [0, 1])
def test_every_scheme_ends_where_one_process_does(schemes, case):
    (rank0, _), (rank1, _) = schemes[0]
    one = schemes[1][case]["weights"]
    for scheme in WRAPPERS[1:]:
        for ours, theirs in zip(rank0[case][scheme]["weights"], one):
            torch.testing.assert_close(ours, theirs, **TOL,
                                       msg=f"{scheme}, problem {case}")
        for a, b in zip(rank0[case][scheme]["weights"],
                        rank1[case][scheme]["weights"]):  # replicas agree
            torch.testing.assert_close(a, b, **EXACT)
    # ours equal PyTorch's wrappers more closely than one process: the
    # same halves, summed the same way
    for ours, theirs in (("data parallel", "DDP"), ("ZeRO-3", "FSDP2")):
        for a, b in zip(rank0[case][ours]["weights"],
                        rank0[case][theirs]["weights"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", [0, 1])
def test_memory_falls_as_the_stages_predict(schemes, case):
    (rank0, _), (rank1, _) = schemes[0]
    make_model = PROBLEMS[case][0]
    params = list(make_model().parameters())
    P = nbytes(params)
    # a rank's pieces: ceil(n / 2) slots of every parameter (padded)
    slots = [4 * sum(piece(p.numel(), r, 2)[0] for p in params)
             for r in (0, 1)]
    owned = [4 * sum(piece(p.numel(), r, 2)[2] - piece(p.numel(), r, 2)[1]
                     for p in params) for r in (0, 1)]
    want = {"data parallel": (P, P, 2 * P), "DDP": (P, P, 2 * P),
            "ZeRO-1": (P, P, 2 * owned[0]),
            "ZeRO-2": (P, owned[0], 2 * owned[0]),
            "ZeRO-3": (slots[0], slots[0], 2 * slots[0])}
    for scheme, (p, g, o) in want.items():
        held = rank0[case][scheme]["held"]
        assert (held["parameters"], held["gradients"],
                held["optimizer"]) == (p, g, o), (scheme, held)
    # the pieces split the parameters: the two ranks' moments add up
    assert (rank0[case]["ZeRO-1"]["held"]["optimizer"] +
            rank1[case]["ZeRO-1"]["held"]["optimizer"]) == 2 * P
    # FSDP2 cuts each parameter along its first dimension: rank 0 holds
    # ceil(rows / 2) rows of every one (ours cut the flattened tensor)
    rows = 4 * sum(-(-p.shape[0] // 2) * (p.numel() // p.shape[0])
                   for p in params)
    fsdp, ours = rank0[case]["FSDP2"]["held"], rank0[case]["ZeRO-3"]["held"]
    assert fsdp == {"parameters": rows, "gradients": rows,
                    "optimizer": 2 * rows}
    if case == 0:  # nothing to pad: exactly half of everything
        assert ours == {"parameters": P // 2, "gradients": P // 2,
                        "optimizer": P}
        assert fsdp == ours


@pytest.mark.parametrize("case", [0, 1])
def test_bytes_sent_match_the_prediction(schemes, case):
    (rank0, _), _ = schemes[0]
    params = list(PROBLEMS[case][0]().parameters())
    P = nbytes(params)
    # the collectives move the padded pieces: ours pad the flattened
    # tensor, FSDP2 the first dimension
    padded = 4 * sum(2 * piece(p.numel(), 0, 2)[0] for p in params)
    by_rows = 4 * sum(2 * -(-p.shape[0] // 2) * (p.numel() // p.shape[0])
                      for p in params)
    whole = {"data parallel": P, "DDP": P, "FSDP2": by_rows}
    for scheme in WRAPPERS[1:]:
        sent = sum(rank0[case][scheme]["sent"].values())
        kind = {"DDP": "data parallel", "FSDP2": "ZeRO-3"}.get(scheme,
                                                              scheme)
        assert sent == step_bytes(kind, whole.get(scheme, padded), 2), \
            (scheme, sent)
    assert step_bytes("ZeRO-3", P, 2) == 1.5 * step_bytes("ZeRO-1", P, 2)
    assert set(SCHEMES) <= set(WRAPPERS)


def test_bad_input_inside_a_group_is_named(schemes):
    (_, errors), _ = schemes[0]
    assert "stage must be 1 or 2" in errors[0] and "got 3" in errors[0]
    assert "n_heads=3" in errors[1] and "2 ranks" in errors[1]
    assert "scheme must be one of" in errors[2] and "ZeRO-4" in errors[2]
    with pytest.raises(ValueError, match="kind must be one of"):
        ring_bytes("all_to_all", 8, 2)
    with pytest.raises(ValueError, match="scheme must be one of"):
        step_bytes("pipeline", 8, 2)


def three_ranks(rank, world_size):
    """Collectives against their definitions, and DataParallel against
    DDP under accumulation, on three ranks."""
    comm = Comm()
    x = torch.arange(6.0) * (rank + 1)  # rank r: r+1 times 0..5
    summed, gathered, mine = x.clone(), torch.empty(6), torch.empty(2)
    comm.all_reduce(summed)
    comm.all_gather(gathered, x[2 * rank:2 * rank + 2])
    comm.reduce_scatter(mine, x)
    copied = x.clone()
    comm.broadcast(copied, src=0)
    collectives = (summed, gathered, mine, copied, dict(comm.sent))
    weights = {}
    for bucket_bytes in (64, 1 << 20):  # many buckets, then one
        for kind in ("ours", "DDP"):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(),
                                  nn.Linear(9, 2))
            replica = (DataParallel(model, Comm(), bucket_bytes)
                       if kind == "ours" else
                       nn.parallel.DistributedDataParallel(model))
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            g = torch.Generator().manual_seed(rank)
            for step in range(2):
                for micro in range(3):  # only the last one synchronises
                    x = torch.randn(4, 5, generator=g)
                    y = torch.randn(4, 2, generator=g)
                    with (replica.no_sync() if micro < 2 else
                          torch.enable_grad()):
                        (loss_fn(replica, x, y) / 3).backward()
                optimizer.step()
                optimizer.zero_grad()
            weights[kind, bucket_bytes] = [p.detach().clone()
                                           for p in model.parameters()]
    return collectives, weights


def test_collectives_and_data_parallel_on_three_ranks():
    results = launch(three_ranks, 3, timeout=60)
    x = [torch.arange(6.0) * (r + 1) for r in range(3)]
    total = sum(x)
    for rank, (collectives, weights) in enumerate(results):
        summed, gathered, mine, copied, sent = collectives
        torch.testing.assert_close(summed, total, **EXACT)
        torch.testing.assert_close(
            gathered, torch.cat([x[r][2 * r:2 * r + 2] for r in range(3)]),
            **EXACT)
        torch.testing.assert_close(mine, total[2 * rank:2 * rank + 2],
                                   **EXACT)
        torch.testing.assert_close(copied, x[0], **EXACT)
        assert sent == {"all_reduce": 2 * 2 / 3 * 24,
                        "all_gather": 2 / 3 * 24,
                        "reduce_scatter": 2 / 3 * 24,
                        "broadcast": 2 / 3 * 24}
        for bucket_bytes in (64, 1 << 20):
            for a, b in zip(weights["ours", bucket_bytes],
                            weights["DDP", bucket_bytes]):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
            for a, b in zip(weights["ours", bucket_bytes],
                            results[0][1]["ours", bucket_bytes]):
                torch.testing.assert_close(a, b, **EXACT)


CONFIGS = [LlamaConfig(vocab_size=8, dim=32, n_layers=1, n_heads=4,
                       n_kv_heads=2, max_seq_len=8),
           LlamaConfig(vocab_size=8, dim=48, n_layers=1, n_heads=6,
                       n_kv_heads=6, max_seq_len=8)]


def split_layers(rank, world_size):
    """Each configuration's feed-forward and attention against their
    splits: (output, input grad, weight grads, bytes sent, predicted)."""
    comm, report = Comm(), []
    for config in CONFIGS:
        torch.manual_seed(0)
        cos, sin = rope_angles(torch.arange(8), config.head_dim)
        for whole, Split, extra in (
                (FeedForward(config.dim, config.ffn_dim), ParallelFeedForward,
                 ()),
                (Attention(config), ParallelAttention, (cos, sin))):
            x = torch.randn(3, 8, config.dim, requires_grad=True)
            split = Split(whole, comm)
            comm.sent.clear()
            y, ys = whole(x, *extra), split(x, *extra)
            target = torch.randn_like(y)
            g = torch.autograd.grad((y * target).sum(),
                                    [x, *whole.parameters()])
            gs = torch.autograd.grad((ys * target).sum(),
                                     [x, *split.parameters()])
            blocks = [a.chunk(world_size, 0 if a.shape[1] == b.shape[1]
                              else 1)[rank] for a, b in zip(g[1:], gs[1:])]
            report.append((y, ys, g[0], gs[0], blocks, list(gs[1:]),
                           comm.total(),
                           tensor_parallel_bytes(y.numel() * 4, world_size)))
    return report


def test_tensor_parallel_layers_equal_llama_layers():
    for report in launch(split_layers, 2, timeout=60):
        for y, ys, gx, gxs, blocks, pieces, sent, predicted in report:
            # float32 sums of up to 128 products, split in two halves
            torch.testing.assert_close(ys, y, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gxs, gx, atol=1e-5, rtol=1e-5)
            for block, mine in zip(blocks, pieces):
                torch.testing.assert_close(mine, block, atol=1e-5,
                                           rtol=1e-5)
            assert sent == predicted


@pytest.mark.parametrize("n,world", [(10, 3), (12, 4), (5, 2), (3, 4)])
def test_shard_indices_equal_distributed_sampler(n, world):
    for shuffle in (True, False):
        for epoch in (0, 3):
            for rank in range(world):
                sampler = DistributedSampler(range(n), num_replicas=world,
                                             rank=rank, shuffle=shuffle,
                                             seed=5)
                sampler.set_epoch(epoch)
                assert shard_indices(n, rank, world, shuffle, 5, epoch) \
                    == list(sampler)
    with pytest.raises(ValueError, match=r"rank must be in 0\.\.1, got 2"):
        shard_indices(4, 2, 2)


def dies(rank, world_size):
    if rank == 1:
        os._exit(7)
    dist.all_reduce(torch.ones(1))


def raises(rank, world_size):
    if rank == 0:
        raise KeyError("no such weight")
    dist.all_reduce(torch.ones(1))


def hangs(rank, world_size):
    if rank == 0:  # rank 1 leaves without the collective rank 0 waits in
        dist.all_reduce(torch.ones(1))


def test_failures_are_clear_errors_not_hangs():
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 died \(exit code "
                                           r"7\)"):
        launch(dies, 2, timeout=20)
    with pytest.raises(RuntimeError, match="rank 0 of 2 failed: KeyError: "
                                           "'no such weight'"):
        launch(raises, 2, timeout=20)
    with pytest.raises(RuntimeError, match="rank 0 of 2 failed|still "
                                           "running after 2"):
        launch(hangs, 2, timeout=2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} is in use"):
            launch(dies, 2, port=port, timeout=20)
    with pytest.raises(ValueError, match="world_size must be a positive "
                                         "int, got 0"):
        launch(dies, 0)


def cave_train(rank, world_size, argv):
    """`cave train` as torchrun would run it on this rank."""
    return cli.main(argv)


def test_cave_train_on_two_ranks_resumes_on_one():
    common = ["--preset", "tiny", "--quiet", "max_steps=12", "bf16=false",
              "checkpoint_interval=4"]
    with tempfile.TemporaryDirectory() as tmp:
        one, two = f"{tmp}/one", f"{tmp}/two"
        assert cli.main(["train", "--out", one, "--stop-at", "8"]
                        + common) == 0
        assert launch(cave_train, 2, ["train", "--out", two, "--stop-at",
                                      "4"] + common, timeout=120) == [0, 0]
        # the rest on one process, from the two ranks' checkpoint
        assert cli.main(["train", "--out", two, "--resume", "--stop-at",
                         "8"] + common[:2]) == 0
        a, b = load_checkpoint(one), load_checkpoint(two)
        assert a["state"]["step"] == b["state"]["step"] == 8
        assert a["state"]["data"] == b["state"]["data"]
        for key in a["model"]:
            torch.testing.assert_close(b["model"][key], a["model"][key],
                                       atol=1e-5, rtol=1e-4)
        # rank 0 alone logged: one start per session, ranks recorded
        log = [json.loads(line) for line in open(f"{two}/log.jsonl")]
        starts = [e for e in log if e["event"] == "start"]
        assert [s.get("ranks") for s in starts] == [2, None]
        steps = [e["step"] for e in log if e["event"] == "train"]
        assert len(steps) == len(set(steps))


def uneven(rank, world_size):
    config = TrainConfig(**PRESETS["tiny"]["train"])
    train_data_parallel(config, LlamaConfig(**PRESETS["tiny"]["model"]),
                        data=shakespeare_split())


def test_a_batch_that_does_not_split_is_refused():
    with pytest.raises(RuntimeError, match="batch_size 8 must divide by "
                                           "the 3 ranks"):
        launch(uneven, 3, timeout=60)


def test_full_run_record():
    record = load_results("distributed")
    run = record["schemes"]
    P = run["param_bytes"]
    table = run["schemes"]
    assert set(table) == set(WRAPPERS)
    for name, s in table.items():
        if name == "one process":
            continue
        # every byte predicted went through the collectives (the pieces'
        # padding and FSDP2's own add under 1 %)
        assert abs(s["sent_bytes_per_step"] - s["predicted_bytes_per_step"]
                   ) <= 0.01 * s["predicted_bytes_per_step"], name
        assert s["max_diff_to_one_process"] < 1e-4, name
    held = {name: table[name]["held_bytes"] for name in table}
    assert held["data parallel"] == {"parameters": P, "gradients": P,
                                     "optimizer": 2 * P}
    assert held["ZeRO-1"]["optimizer"] <= 0.51 * 2 * P
    assert held["ZeRO-2"]["gradients"] <= 0.51 * P
    assert held["ZeRO-3"]["parameters"] <= 0.51 * P
    runs = record["torchrun"]["runs"]
    for way in ("torchrun, 2 ranks", "2 ranks, resumed on 1"):
        # bfloat16 autocast on batches cut in two: rounding, not drift
        assert runs[way][-1]["max_diff_to_one_process"] < 0.05, way
        assert abs(runs[way][-1]["last_val"]["val_loss"] -
                   runs["one process"][-1]["last_val"]["val_loss"]) < 0.02
