# Generated from docs/scale/distributed.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Distributed training (docs/scale/distributed.md:39)
"""Data-parallel, sharded and tensor-parallel training on torch.distributed.

The chapter docs/scale/distributed.md builds, in order:

    free_port, launch   N ranks of a gloo group on this machine, every
                        collective under a timeout: a dead rank or a port
                        in use is a clear error, never a hang
    ring_bytes, Comm    the four collectives, counting the bytes each rank
                        sends (what a bandwidth-optimal ring sends)
    DataParallel        the start broadcast, gradients all-reduced in
                        buckets while backward runs, no_sync for
                        accumulation; equal to DistributedDataParallel
    shard_indices       the distributed sampler; equal to DistributedSampler
    ZeroAdamW           ZeRO stages 1 and 2: AdamW's state, then the
                        gradients, split over the ranks
    FullyShard          ZeRO stage 3: parameters split too, gathered
                        before use and freed after; equal to fully_shard
    step_bytes, state_bytes, train_scheme
                        bytes sent per step (predicted, measured) and
                        memory held per rank, for every scheme
    ColumnParallelLinear, RowParallelLinear, ParallelFeedForward,
    ParallelAttention   Megatron's tensor parallelism of LLaMA's layers
    train_data_parallel, torchrun_train
                        `cave train` under torchrun --nproc-per-node N
    full_run            bytes and time per step on 1 and 2 processes
"""

import contextlib
import datetime
import inspect
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cave.fundamentals.checkpoints import load_checkpoint
from cave.fundamentals.data import Batches, shakespeare_split
from cave.fundamentals.essentials import max_diff
from cave.transformers.llama import (Attention, Block, FeedForward, Llama,
                                     LlamaConfig, RMSNorm, apply_rope)
from cave.transformers.llama_training import (TrainConfig, TrainingRun,
                                               lr_at)


# § Ranks and process groups (docs/scale/distributed.md:120)
def free_port() -> int:
    """A TCP port on this machine that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # port 0: the system picks a free one
        return s.getsockname()[1]


def shipped(value, out: bool):
    """value with every tensor as a numpy array (out) or back again
    (not out), in dicts, lists and tuples: a tensor sent from a rank as
    it is travels as shared memory, which vanishes when the rank exits."""
    if out and isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return ("tensor", t.dtype == torch.bfloat16, bits.numpy().copy())
    if not out and isinstance(value, tuple) and value[:1] == ("tensor",):
        t = torch.from_numpy(value[2])
        return t.view(torch.bfloat16) if value[1] else t
    if isinstance(value, dict):
        return {k: shipped(v, out) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(shipped(v, out) for v in value)
    return value


def _rank_main(rank: int, fn, world_size: int, port: int, timeout: float,
               threads: int, results, errors, args: tuple) -> None:
    """One rank: join the group, run fn, hand its result back; or hand
    back, stamped with the time, the error that stopped it."""
    torch.set_num_threads(threads)
    failed_at = None
    try:
        try:
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout))  # collectives
        except Exception as err:
            if "EADDRINUSE" in str(err) or "in use" in str(err):
                raise RuntimeError(f"port {port} is in use; pass another "
                                   f"(free_port() finds one)") from None
            raise
        try:
            results.put((rank, shipped(fn(rank, world_size, *args), True)))
        except Exception:
            failed_at = time.monotonic()  # before leaving the group wakes
            raise                          # the others with errors
        finally:
            dist.destroy_process_group()
    except Exception as err:
        text = f"{type(err).__name__}: {err}".splitlines()[0]
        errors.put((failed_at or time.monotonic(), rank, text))
        raise


def launch(fn, world_size: int = 2, *args, timeout: float = 30.0,
           port: int | None = None, threads: int = 1) -> list:
    """Run fn(rank, world_size, *args) on world_size processes of a gloo
    group; return their results, rank by rank.

    The processes are forked (they share what this one imported, so they
    start in a fraction of a second; torchrun starts fresh ones instead).
    A rank that raises or dies, a port in use, or ranks still running
    after `timeout` seconds raise RuntimeError naming the rank and why.
    When one rank fails, its partners fail next ("connection reset"):
    the error reported is the first one in time, the cause.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got "
                         f"{world_size!r}")
    port = free_port() if port is None else port
    import torch._dynamo  # noqa: F401  torch.optim imports it on first use:
    # once here, or once in every forked rank (seconds each)
    method = "fork" if sys.platform == "linux" else "spawn"
    results, errors = (mp.get_context(method).SimpleQueue() for _ in "ab")
    ranks = mp.start_processes(
        _rank_main, nprocs=world_size, join=False, start_method=method,
        args=(fn, world_size, port, timeout, threads, results, errors,
              args))
    out, deadline = {}, time.monotonic() + timeout
    try:
        while True:
            while not results.empty():  # drain: a full pipe blocks a rank
                rank, value = results.get()
                out[rank] = shipped(value, False)
            if ranks.join(timeout=0.02):
                break
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(ranks.processes)
                         if p.is_alive()]
                raise RuntimeError(f"ranks {alive} of {world_size} still "
                                   f"running after {timeout} s: a "
                                   f"collective waits for a rank that "
                                   f"never joins it")
    except mp.ProcessRaisedException as err:
        failures = []  # (time, rank, error) of each rank that raised
        while not errors.empty():
            failures.append(errors.get())
        _, rank, text = min(failures, default=(
            0, err.error_index, str(err).strip().splitlines()[-1]))
        raise RuntimeError(f"rank {rank} of {world_size} failed: "
                           f"{text}") from None
    except mp.ProcessExitedException as err:
        raise RuntimeError(f"rank {err.error_index} of {world_size} died "
                           f"(exit code {err.exit_code}) before it "
                           f"finished") from None
    finally:
        for p in ranks.processes:  # after an error, leave no rank behind
            if p.is_alive():
                p.kill()
                p.join()
    while not results.empty():
        rank, value = results.get()
        out[rank] = shipped(value, False)
    return [out.get(r) for r in range(world_size)]


# § The four collectives (docs/scale/distributed.md:313)
def ring_bytes(kind: str, nbytes: float, world_size: int) -> float:
    """Bytes one rank sends in a bandwidth-optimal ring collective on a
    tensor of nbytes (the full tensor: the all-reduced one, the gathered
    output, the reduce-scattered input, the broadcast one)."""
    share = (world_size - 1) / world_size  # the pieces that live elsewhere
    factors = {"all_reduce": 2 * share,  # reduce-scatter, then all-gather
               "all_gather": share, "reduce_scatter": share,
               "broadcast": share}  # a pipelined chain: N - 1 forwarders
    if kind not in factors:
        raise ValueError(f"kind must be one of {sorted(factors)}, got "
                         f"{kind!r}")
    return factors[kind] * nbytes


class Comm:
    """The four collectives of a process group, each one counting the
    bytes this rank sends (`sent`, by kind) and the calls (`calls`)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.sent, self.calls = Counter(), Counter()

    def _count(self, kind: str, full: Tensor) -> None:
        nbytes = full.numel() * full.element_size()
        self.sent[kind] += ring_bytes(kind, nbytes, self.world_size)
        self.calls[kind] += 1

    def all_reduce(self, x: Tensor, async_op: bool = False):
        """x <- the sum of every rank's x, in place."""
        self._count("all_reduce", x)
        return dist.all_reduce(x, group=self.group, async_op=async_op)

    def all_gather(self, out: Tensor, shard: Tensor,
                   async_op: bool = False):
        """out (N * n,) <- every rank's shard (n,), rank by rank."""
        self._count("all_gather", out)
        return dist.all_gather_single(out, shard, group=self.group,
                                      async_op=async_op)

    def reduce_scatter(self, out: Tensor, full: Tensor,
                       async_op: bool = False):
        """out (n,) <- piece `rank` of the sum of every rank's full
        (N * n,)."""
        self._count("reduce_scatter", full)
        return dist.reduce_scatter_single(out, full, group=self.group,
                                          async_op=async_op)

    def broadcast(self, x: Tensor, src: int = 0):
        """x <- rank src's x, in place, on every rank."""
        self._count("broadcast", x)
        return dist.broadcast(x, src=src, group=self.group)

    def total(self) -> float:
        return sum(self.sent.values())


# § Data parallelism from scratch (docs/scale/distributed.md:440)
class DataParallel(nn.Module):
    """Data parallelism from scratch: one replica per rank.

    At the start, every rank copies rank 0's weights (a broadcast). In
    backward, each parameter's hook fires once its gradient is complete;
    when a bucket's gradients are all complete, the bucket is all-reduced
    asynchronously while backward goes on with earlier layers. The hook
    that completes the last bucket waits for all of them and writes the
    averages back. Inside `no_sync()` the hooks do nothing: gradients
    accumulate locally. Every parameter must receive a gradient in every
    synchronised backward (DDP's find_unused_parameters=False).
    """

    def __init__(self, module: nn.Module, comm: Comm,
                 bucket_bytes: int = 1 << 20):
        super().__init__()
        self.module, self.comm, self.sync = module, comm, True
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                comm.broadcast(t, src=0)  # one starting point for all
        params = [p for p in module.parameters() if p.requires_grad]
        # backward meets the last layers first: fill buckets from the end
        self.buckets, size = [[]], 0
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            if self.buckets[-1] and size + nbytes > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self.bucket_of = {p: i for i, b in enumerate(self.buckets)
                          for p in b}
        self.ready = [0] * len(self.buckets)
        self.in_flight = []  # (bucket index, flat gradients, work)
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _grad_ready(self, p: Tensor) -> None:
        if not self.sync:
            return
        i = self.bucket_of[p]
        self.ready[i] += 1
        if self.ready[i] < len(self.buckets[i]):
            return
        flat = torch.cat([q.grad.flatten() for q in self.buckets[i]])
        work = self.comm.all_reduce(flat, async_op=True)  # sent; go on
        self.in_flight.append((i, flat, work))
        if len(self.in_flight) == len(self.buckets):  # the last bucket
            self._finish()

    def _finish(self) -> None:
        for i, flat, work in self.in_flight:
            work.wait()
            flat /= self.comm.world_size  # the sum -> the mean
            offset = 0
            for q in self.buckets[i]:
                q.grad.copy_(flat[offset:offset + q.numel()].view_as(q))
                offset += q.numel()
        self.ready = [0] * len(self.buckets)
        self.in_flight = []

    @contextlib.contextmanager
    def no_sync(self):
        """Forward and backward in here accumulate without communicating;
        the next backward outside sends the accumulated sums."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True


# § The sampler, and accumulation without synchronising (docs/scale/distributed.md:593)
def shard_indices(n: int, rank: int, world_size: int, shuffle: bool = True,
                  seed: int = 0, epoch: int = 0) -> list[int]:
    """The examples rank `rank` sees in one epoch of a data set of n:
    one shuffled order for all ranks (seed + epoch), padded by repeating
    its start to a multiple of world_size, dealt out like cards."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    total = math.ceil(n / world_size) * world_size
    order += (order * math.ceil(total / max(n, 1)))[:total - n]
    return order[rank:total:world_size]


# § ZeRO: sharding the optimiser, the gradients, the parameters (docs/scale/distributed.md:713)
def piece(numel: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """Rank `rank`'s piece of a flattened tensor of numel elements:
    (chunk, lo, hi). Every rank is given chunk = ceil(numel / N) slots;
    it owns elements lo..hi-1, and the last ranks' slots are part padding."""
    chunk = math.ceil(numel / world_size)
    lo = min(rank * chunk, numel)
    return chunk, lo, min(lo + chunk, numel)


class ZeroAdamW:
    """AdamW with ZeRO's sharding: each rank keeps the moments of, and
    updates, only its piece of every parameter (stage 1); at stage 2 it
    also keeps only its piece of every gradient, reduce-scattered the
    moment backward completes it. After the update, an all-gather gives
    every rank the whole new weights."""

    def __init__(self, params, comm: Comm, stage: int = 1, **adamw):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2 (stage 3 is "
                             f"FullyShard), got {stage!r}")
        self.params = [p for p in params if p.requires_grad]
        self.comm, self.stage = comm, stage
        self.pieces = []  # (chunk, lo, hi, a view of this rank's piece)
        for p in self.params:
            chunk, lo, hi = piece(p.numel(), comm.rank, comm.world_size)
            self.pieces.append((chunk, lo, hi, p.detach().view(-1)[lo:hi]))
        # AdamW's moments exist only for the pieces: 2 * P / N floats
        self.optimizer = torch.optim.AdamW([v for *_, v in self.pieces],
                                           **adamw)
        if stage == 2:
            for i, p in enumerate(self.params):
                p.register_post_accumulate_grad_hook(
                    lambda p, i=i: self._reduce(i))

    def _reduce(self, i: int) -> None:
        """This rank's piece of the mean gradient of parameter i."""
        p, (chunk, lo, hi, view) = self.params[i], self.pieces[i]
        N = self.comm.world_size
        full = F.pad(p.grad.flatten(), (0, chunk * N - p.numel()))
        mine = full.new_empty(chunk)
        self.comm.reduce_scatter(mine, full)  # (chunk,) summed over ranks
        mine = mine[:hi - lo] / N
        view.grad = mine if view.grad is None else view.grad + mine
        if self.stage == 2:
            p.grad = None  # the whole gradient leaves memory at once

    @torch.no_grad()
    def step(self) -> None:
        if self.stage == 1:
            for i in range(len(self.params)):
                self._reduce(i)
        self.optimizer.step()  # AdamW on this rank's pieces only
        for p, (chunk, lo, hi, view) in zip(self.params, self.pieces):
            full = p.new_empty(chunk * self.comm.world_size)
            self.comm.all_gather(full, F.pad(view, (0, chunk - (hi - lo))))
            p.view(-1).copy_(full[:p.numel()])  # every rank: new weights

    def zero_grad(self) -> None:
        for p, (*_, view) in zip(self.params, self.pieces):
            p.grad = view.grad = None


class GatherPieces(torch.autograd.Function):
    """Forward: all-gather the ranks' pieces into the whole flat tensor.
    Backward: reduce-scatter its gradient back into the mean gradient of
    this rank's piece."""

    @staticmethod
    def forward(ctx, mine: Tensor, comm: Comm, numel: int) -> Tensor:
        ctx.comm, ctx.numel = comm, numel
        full = mine.new_empty(mine.numel() * comm.world_size)
        comm.all_gather(full, mine)
        return full[:numel]  # (numel,)

    @staticmethod
    def backward(ctx, grad: Tensor):
        N = ctx.comm.world_size
        chunk = math.ceil(ctx.numel / N)
        mine = grad.new_empty(chunk)
        ctx.comm.reduce_scatter(mine, F.pad(grad, (0, chunk * N - ctx.numel)))
        return mine / N, None, None  # (chunk,)


class FullyShard(nn.Module):
    """ZeRO stage 3 around one module (a unit): the unit's parameters
    become this rank's pieces; forward gathers the whole weights, uses
    them and lets them go; backward gathers them again (the forward is
    recomputed under torch.utils.checkpoint) and reduce-scatters their
    gradients. Parameters, gradients and AdamW's moments: all P / N."""

    def __init__(self, module: nn.Module, comm: Comm):
        super().__init__()
        object.__setattr__(self, "unit", module)  # not a submodule: its
        self.comm, self.layout = comm, []         # emptied weights hidden
        self.pieces = nn.ParameterList()
        for name, p in module.named_parameters():
            chunk, lo, hi = piece(p.numel(), comm.rank, comm.world_size)
            mine = F.pad(p.detach().flatten()[lo:hi], (0, chunk - (hi - lo)))
            self.pieces.append(nn.Parameter(mine.clone()))  # (chunk,)
            self.layout.append((name, p.shape, p.numel()))
            p.data = p.new_empty(0)  # the whole weight leaves memory

    def gathered(self) -> dict[str, Tensor]:
        """The unit's whole weights, gathered from every rank."""
        return {name: GatherPieces.apply(mine, self.comm, n).view(shape)
                for mine, (name, shape, n) in zip(self.pieces, self.layout)}

    def forward(self, *args):
        def run(*inputs):
            weights = self.gathered()  # alive only inside run
            return torch.func.functional_call(self.unit, weights, inputs)

        return checkpoint(run, *args, use_reentrant=False)


def outermost(model: nn.Module, unit) -> list[tuple]:
    """(parent, name, module) for each submodule of type unit that no
    other one contains."""
    found = []
    for name, child in model.named_children():
        if isinstance(child, unit):
            found.append((model, name, child))
        else:
            found += outermost(child, unit)
    return found


def fully_shard_units(model: nn.Module, comm: Comm,
                      unit=(nn.Linear,)) -> nn.Module:
    """Wrap, in place, every submodule of type `unit` in FullyShard;
    refuse a model with parameters outside them (they would stay whole)."""
    for parent, name, child in outermost(model, unit):
        setattr(parent, name, FullyShard(child, comm))
    whole = [n for n, p in model.named_parameters()
             if not n.split(".")[-2:-1] == ["pieces"]]
    if whole:
        raise ValueError(f"parameters outside any {unit} unit would stay "
                         f"whole: {whole}")
    return model


# § What each stage sends and holds (docs/scale/distributed.md:883)
SCHEMES = ("data parallel", "ZeRO-1", "ZeRO-2", "ZeRO-3")


def step_bytes(scheme: str, param_bytes: int, world_size: int) -> float:
    """Bytes one rank sends per optimiser step (one micro-batch) for P =
    param_bytes of parameters:

        data parallel   all-reduce of the gradients            2 (N-1)/N P
        ZeRO-1, ZeRO-2  reduce-scatter of the gradients,
                        all-gather of the new weights          2 (N-1)/N P
        ZeRO-3          all-gather forward, again backward,
                        reduce-scatter of the gradients        3 (N-1)/N P
    """
    calls = {"data parallel": ["all_reduce"],
             "ZeRO-1": ["reduce_scatter", "all_gather"],
             "ZeRO-2": ["reduce_scatter", "all_gather"],
             "ZeRO-3": ["all_gather", "all_gather", "reduce_scatter"]}
    if scheme not in calls:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    return sum(ring_bytes(kind, param_bytes, world_size)
               for kind in calls[scheme])


def nbytes(tensors) -> int:
    """Bytes of the tensors' data on this rank (a DTensor's local part)."""
    local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors)
    return sum(t.numel() * t.element_size() for t in local)


def state_bytes(model: nn.Module, optimizer) -> dict[str, int]:
    """What this rank holds now: parameters, gradients (whole ones and
    ZeroAdamW's pieces) and the optimiser's moments (not its step
    counters)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeroAdamW's AdamW
    params = list(model.parameters())
    own = {id(p) for p in params}
    pieces = [v for g in inner.param_groups for v in g["params"]
              if id(v) not in own]
    return {"parameters": nbytes(params),
            "gradients": nbytes(t.grad for t in params + pieces
                                if t.grad is not None),
            "optimizer": nbytes(t for s in inner.state.values()
                                for k, t in s.items() if k != "step")}


@contextlib.contextmanager
def watching(comm: Comm):
    """Count, into comm, the collectives that PyTorch's own Python code
    (fully_shard's) calls through torch.distributed while inside."""
    kinds = {"all_gather_single": ("all_gather", "output_tensor"),
             "reduce_scatter_single": ("reduce_scatter", "input"),
             "all_reduce": ("all_reduce", "tensor")}  # (kind, full tensor)
    saved = {name: getattr(dist, name) for name in kinds}

    def counting(name):
        kind, full = kinds[name]
        signature = inspect.signature(saved[name])

        def call(*args, **kwargs):
            comm._count(kind, signature.bind(*args, **kwargs).arguments[full])
            return saved[name](*args, **kwargs)
        return call

    for name in kinds:
        setattr(dist, name, counting(name))
    try:
        yield comm
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def counting_hook(comm: Comm):
    """A DistributedDataParallel communication hook: its default
    all-reduce of the mean, counting each bucket into comm."""
    def hook(state, bucket):
        grads = bucket.buffer()
        comm._count("all_reduce", grads)
        grads.div_(comm.world_size)
        work = dist.all_reduce(grads, group=comm.group, async_op=True)
        return work.get_future().then(lambda f: f.value()[0])
    return hook


WRAPPERS = ("one process", "data parallel", "DDP", "ZeRO-1", "ZeRO-2",
            "ZeRO-3", "FSDP2")


def wrap(model: nn.Module, comm: Comm, scheme: str, lr: float,
         unit=(nn.Linear,)):
    """model made ready for `scheme` on this rank, and its optimiser
    (AdamW at lr, no weight decay); every rank passes the same model."""
    adamw = dict(lr=lr, weight_decay=0.0)
    if scheme == "one process":
        return model, torch.optim.AdamW(model.parameters(), **adamw)
    if scheme == "data parallel":
        model = DataParallel(model, comm)
    elif scheme == "DDP":
        model = nn.parallel.DistributedDataParallel(model)
        model.register_comm_hook(None, counting_hook(comm))
    elif scheme in ("ZeRO-1", "ZeRO-2"):
        return model, ZeroAdamW(model.parameters(), comm,
                                stage=int(scheme[-1]), **adamw)
    elif scheme == "ZeRO-3":
        model = fully_shard_units(model, comm, unit)
    elif scheme == "FSDP2":
        from torch.distributed.fsdp import fully_shard

        for _, _, m in outermost(model, unit):
            fully_shard(m)
        fully_shard(model)
    else:
        raise ValueError(f"scheme must be one of {WRAPPERS}, got "
                         f"{scheme!r}")
    return model, torch.optim.AdamW(model.parameters(), **adamw)


def whole_weights(model: nn.Module) -> list[Tensor]:
    """Every weight whole, as one process would hold it, whatever the
    wrapping (a collective under ZeRO-3 and FSDP2: call it on all ranks)."""
    with torch.no_grad():
        if any(isinstance(m, FullyShard) for m in model.modules()):
            return [w for m in model.modules() if isinstance(m, FullyShard)
                    for w in m.gathered().values()]
        return [p.full_tensor() if hasattr(p, "full_tensor") else
                p.detach().clone() for p in model.parameters()]


def train_scheme(rank: int, world_size: int, scheme: str, make_model,
                 batches: list, loss_fn, lr: float = 1e-2,
                 unit=(nn.Linear,)) -> dict:
    """Train make_model() on `batches` (each a tuple of whole batches,
    split by rows over the ranks) with `scheme`; run on every rank.

    Returns the final whole weights, what the rank held after its last
    backward (gradients) and step (parameters, moments), the bytes it
    sent by kind, and the seconds of each step."""
    comm = Comm()
    torch.manual_seed(0)  # the same starting weights on every rank
    model, optimizer = wrap(make_model(), comm, scheme, lr, unit)
    comm.sent.clear()  # count the steps only, not the first broadcast
    seconds = []
    with watching(comm) if scheme == "FSDP2" else contextlib.nullcontext():
        for batch in batches:
            start = time.perf_counter()
            rows = batch[0].shape[0] // world_size
            mine = [t[rank * rows:(rank + 1) * rows] for t in batch]
            loss_fn(model, *mine).backward()
            grads = state_bytes(model, optimizer)["gradients"]
            optimizer.step()
            optimizer.zero_grad()
            seconds.append(time.perf_counter() - start)
        held = {**state_bytes(model, optimizer), "gradients": grads}
        sent = {k: v / len(batches) for k, v in comm.sent.items()}
        weights = whole_weights(model)
    return {"weights": weights, "held": held, "sent": sent,
            "seconds": seconds}


# § Tensor parallelism (docs/scale/distributed.md:1130)
class CopyToRanks(torch.autograd.Function):
    """Megatron's f: forward, the identity (every rank holds the whole
    input); backward, the all-reduce of the input's partial gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, comm: Comm) -> Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        ctx.comm.all_reduce(grad)  # each rank's part of dL/dx, summed
        return grad, None


class SumOverRanks(torch.autograd.Function):
    """Megatron's g: forward, the all-reduce of the ranks' partial sums;
    backward, the identity (every rank needs the whole gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, comm: Comm) -> Tensor:
        x = x.contiguous().clone()
        comm.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def split_rows(weight: Tensor, comm: Comm) -> Tensor:
    """This rank's block of rows (outputs) of a (out, in) weight."""
    out = weight.shape[0]
    if out % comm.world_size:
        raise ValueError(f"{out} output features do not split over "
                         f"{comm.world_size} ranks")
    return weight.chunk(comm.world_size, dim=0)[comm.rank]


class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T: rank r computes its slice of the outputs (W's rows
    r*out/N .. (r+1)*out/N, the columns of W^T, hence the name). Takes
    the whole input (after CopyToRanks); returns its slice."""

    def __init__(self, linear: nn.Linear, comm: Comm):
        super().__init__()
        self.weight = nn.Parameter(split_rows(linear.weight.detach(),
                                              comm).clone())  # (out/N, in)
        self.bias = None if linear.bias is None else nn.Parameter(
            split_rows(linear.bias.detach()[:, None], comm)[:, 0].clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., out/N)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T: rank r holds W's columns (inputs) r*in/N ..
    (r+1)*in/N, takes its slice x_r of the input and computes a partial
    sum; SumOverRanks adds the N partial sums (the bias once, after)."""

    def __init__(self, linear: nn.Linear, comm: Comm):
        super().__init__()
        self.comm = comm
        self.weight = nn.Parameter(split_rows(linear.weight.detach().T,
                                              comm).T.clone())  # (out, in/N)
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = SumOverRanks.apply(F.linear(x, self.weight), self.comm)
        return y if self.bias is None else y + self.bias  # (..., out)


class ParallelFeedForward(nn.Module):
    """LLaMA's SwiGLU split over the ranks: w1 and w3 by columns, w2 by
    rows; one all-reduce forward (in w2), one backward (in CopyToRanks)."""

    def __init__(self, ff: FeedForward, comm: Comm):
        super().__init__()
        self.comm = comm
        self.w1 = ColumnParallelLinear(ff.w1, comm)  # (hidden/N, dim)
        self.w3 = ColumnParallelLinear(ff.w3, comm)  # (hidden/N, dim)
        self.w2 = RowParallelLinear(ff.w2, comm)  # (dim, hidden/N)

    def forward(self, x: Tensor) -> Tensor:
        x = CopyToRanks.apply(x, self.comm)  # (B, T, dim) on every rank
        gate = F.silu(self.w1(x))  # (B, T, hidden/N)
        return self.w2(gate * self.w3(x))  # (B, T, dim), summed


class ParallelAttention(nn.Module):
    """LLaMA's grouped-query attention split by heads: rank r keeps
    n_heads/N query heads and n_kv_heads/N key-value heads (wq, wk, wv
    by columns) and its slice of wo's inputs (wo by rows). Heads never
    talk to each other, so nothing is sent between the projections."""

    def __init__(self, attn: Attention, comm: Comm):
        super().__init__()
        N = comm.world_size
        if attn.n_heads % N or attn.n_kv_heads % N:
            raise ValueError(f"n_heads={attn.n_heads} and n_kv_heads="
                             f"{attn.n_kv_heads} must both divide by the "
                             f"{N} ranks")
        self.comm, self.head_dim = comm, attn.head_dim
        self.n_heads, self.n_kv_heads = attn.n_heads // N, attn.n_kv_heads // N
        self.wq = ColumnParallelLinear(attn.wq, comm)  # (C/N, C)
        self.wk = ColumnParallelLinear(attn.wk, comm)  # (kv/N, C)
        self.wv = ColumnParallelLinear(attn.wv, comm)  # (kv/N, C)
        self.wo = RowParallelLinear(attn.wo, comm)  # (C, C/N)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, C = x.shape
        hd = self.head_dim
        x = CopyToRanks.apply(x, self.comm)  # (B, T, C) on every rank
        q = self.wq(x).view(B, T, self.n_heads, hd).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        # q (B, H/N, T, hd); k, v (B, H_kv/N, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True,
            enable_gqa=self.n_heads != self.n_kv_heads)  # (B, H/N, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * hd)  # (B,T,C/N)
        return self.wo(y)  # (B, T, C), summed over the ranks


def tensor_parallel_bytes(activation_bytes: int, world_size: int) -> float:
    """Bytes one rank sends per forward and backward of one tensor-
    parallel layer (a feed-forward or an attention): one all-reduce of
    its (B, T, C) output forward, one of its input's gradient backward."""
    return 2 * ring_bytes("all_reduce", activation_bytes, world_size)


# § `cave train` on many ranks (docs/scale/distributed.md:1353)
def train_data_parallel(config: TrainConfig, model_config: LlamaConfig,
                        out_dir=None, resume: bool = False,
                        stop_at: int | None = None, stream=None,
                        data=None) -> dict:
    """llama_training's loop on every rank of the running process group.

    Every rank draws the same whole micro-batch (one data stream, seeded
    as in one process) and trains on its rows: rank r of N takes rows
    r*B/N .. (r+1)*B/N. The mean of the ranks' gradients is then the
    gradient of the whole batch, and a checkpoint (weights, AdamW, data
    position) is exactly one process's: it resumes on any number of
    ranks. Rank 0 alone evaluates, logs and writes checkpoints.
    """
    rank, N = dist.get_rank(), dist.get_world_size()
    if config.batch_size % N:
        raise ValueError(f"batch_size {config.batch_size} must divide by "
                         f"the {N} ranks (each takes batch_size / N rows "
                         f"of every micro-batch)")
    lead = rank == 0  # the one rank that evaluates, logs and checkpoints
    run = TrainingRun(config, model_config, out_dir, resume, stream, data,
                      writes=lead)  # every rank reads the checkpoint
    model, optimizer, batches = run.model, run.optimizer, run.batches
    device, comm = run.device, Comm()
    replica = DataParallel(model, comm)  # rank 0's weights everywhere
    rows = slice(rank * config.batch_size // N,
                 (rank + 1) * config.batch_size // N)
    last = min(config.max_steps if stop_at is None else stop_at,
               config.max_steps)
    step, tokens = run.begin(ranks=N)
    model.train()
    while step < last:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            x, y = batches.next()  # (B, T) each, the same on every rank
            x, y = x[rows].to(device), y[rows].to(device)  # (B/N, T)
            last_micro = micro == config.grad_accum - 1
            with contextlib.nullcontext() if last_micro else \
                    replica.no_sync():  # forward and backward inside
                with torch.autocast(device.type, torch.bfloat16,
                                    enabled=config.bf16):
                    _, loss = replica(x, targets=y)
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach()
        comm.all_reduce(loss_sum)  # the whole batch's loss, for the log
        if config.grad_clip > 0:  # the same mean gradient on every rank
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += config.tokens_per_step
        if lead:
            run.after_step(step, tokens, loss_sum / config.grad_accum / N,
                           lr, last)
    dist.barrier()  # no rank leaves before rank 0's last checkpoint
    return run.finish(step, tokens, ranks=N, sent_bytes=comm.total())


def torchrun_train(config: TrainConfig, model_config: LlamaConfig,
                   out_dir=None, **kwargs) -> dict | None:
    """`cave train` under `torchrun --nproc-per-node N`: join the group
    torchrun describes in the environment (nccl on GPUs, gloo on the
    CPU: one GPU per rank, LOCAL_RANK's), train, leave. Returns the
    summary on rank 0 and None on the others."""
    joined = not dist.is_initialized()
    if joined:
        cuda = config.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    try:
        summary = train_data_parallel(config, model_config, out_dir,
                                      **kwargs)
    finally:
        if joined:
            dist.destroy_process_group()
    return summary if rank == 0 else None


# § Measured: bytes and time per step (docs/scale/distributed.md:1488)
def llama_case(steps: int, batch_size: int = 32, block_size: int = 64,
               **model_kw):
    """A LLaMA problem for train_scheme: (make_model, batches, loss_fn,
    unit), its units the blocks, the embedding, the norm and the head."""
    tokenizer, train_ids, _ = shakespeare_split()
    config = LlamaConfig(vocab_size=tokenizer.vocab_size,
                         max_seq_len=block_size, **model_kw)
    stream = Batches(train_ids, batch_size, block_size, seed=0)
    batches = [stream.next() for _ in range(steps)]  # (B, T) pairs

    def loss_fn(model, x, y):
        return model(x, targets=y)[1]

    return (lambda: Llama(config), batches, loss_fn,
            (Block, nn.Embedding, RMSNorm, nn.Linear))


FULL_RUN = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4)  # quick's


def schemes_run(device=None, steps: int = 20, rounds: int = 2,
                batch_size: int = 32, **model_kw) -> dict:
    """Each scheme on the quick preset's LLaMA, on 1 process (one
    process) or 2 (the others), one thread each, `rounds` times
    interleaved: seconds per step (median after 3 warm-up steps), bytes
    sent per step by rank 0 (measured, and as step_bytes predicts),
    memory held by rank 0, and each scheme's distance to one process."""
    if device not in (None, "cpu"):
        raise ValueError(f"the full run measures CPU processes on gloo; "
                         f"got device={device!r}")
    model_kw = {**FULL_RUN, **model_kw}
    make_model, batches, loss_fn, unit = llama_case(steps, batch_size,
                                                    **model_kw)
    param_bytes = nbytes(make_model().parameters())
    times, results = {s: [] for s in WRAPPERS}, {}
    for _ in range(rounds):
        for scheme in WRAPPERS:
            N = 1 if scheme == "one process" else 2
            out = launch(train_scheme, N, scheme, make_model, batches,
                         loss_fn, 1e-3, unit, timeout=900)
            times[scheme].append(sorted(out[0]["seconds"][3:])[
                (steps - 3) // 2])
            results[scheme] = out[0]  # the last round's
    reference = results["one process"]["weights"]
    table = {}
    for scheme in WRAPPERS:
        r = results[scheme]
        table[scheme] = {
            "ranks": 1 if scheme == "one process" else 2,
            "seconds_per_step": sorted(times[scheme])[0],
            "seconds_per_step_each_round": times[scheme],
            "sent_bytes_per_step": sum(r["sent"].values()),
            "sent_by_kind": r["sent"],
            "predicted_bytes_per_step": step_bytes(
                scheme.replace("DDP", "data parallel").replace(
                    "FSDP2", "ZeRO-3"), param_bytes, 2)
            if scheme != "one process" else 0.0,
            "held_bytes": r["held"],
            "max_diff_to_one_process": max(
                max_diff(a, b) for a, b in zip(r["weights"], reference))}
    return {"model": model_kw, "batch_size": batch_size,
            "block_size": 64, "steps": steps, "rounds": rounds,
            "param_bytes": param_bytes, "threads_per_rank": 1,
            "cpu": torch.backends.cpu.get_cpu_capability(),
            "schemes": table}


def cave_train(argv: list[str], ranks: int = 0) -> dict:
    """Run `cave train ARGV --quiet` in a fresh process, under torchrun
    with `ranks` ranks (0: plain), one thread per process; its output
    and wall seconds."""
    launcher = [sys.executable, "-m", "cave"]
    if ranks:
        launcher = [sys.executable, "-m", "torch.distributed.run",
                    "--nproc-per-node", str(ranks), "-m", "cave"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(launcher + argv + ["--quiet"], env=env, text=True,
                          capture_output=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"cave {' '.join(argv)} ({ranks} ranks) failed:"
                           f" {done.stderr.strip()[-500:]}")
    return {"command": " ".join(["cave"] + argv), "ranks": ranks or 1,
            "stdout": done.stdout.strip(),
            "wall_seconds": time.perf_counter() - start}


def torchrun_run(device=None, preset: str = "tiny",
                 stop_at: int = 20) -> dict:
    """`cave train --preset tiny` three ways: one process; torchrun with
    2 ranks; 2 ranks stopped at step stop_at and resumed in one process.
    Each run's last training and validation lines of its log, and how far
    its final weights are from the one process's."""
    if device not in (None, "cpu"):
        raise ValueError(f"this part runs on the CPU; got {device!r}")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        ways = {"one process": [([], 0)],
                "torchrun, 2 ranks": [([], 2)],
                "2 ranks, resumed on 1": [(["--stop-at", str(stop_at)], 2),
                                          (["--resume"], 0)]}
        for i, (way, calls) in enumerate(ways.items()):
            out = f"{tmp}/{i}"
            runs[way] = [cave_train(["train", "--preset", preset, "--out",
                                     out] + extra, ranks)
                         for extra, ranks in calls]
            log = [json.loads(line) for line in
                   open(f"{out}/log.jsonl", encoding="utf-8")]
            runs[way].append({
                "last_train": [e for e in log if e["event"] == "train"][-1],
                "last_val": [e for e in log if e["event"] == "val"][-1],
                "weights": load_checkpoint(out)["model"]})
        first = runs["one process"][-1]["weights"]
        for way, calls in runs.items():
            weights = calls[-1].pop("weights")
            calls[-1]["max_diff_to_one_process"] = max(
                max_diff(weights[k], first[k]) for k in first)
    return {"preset": preset, "stop_at": stop_at, "runs": runs}


FULL_RUN_PARTS = ("schemes", "torchrun")


def full_run(device=None, part: str = "schemes", **overrides) -> dict:
    """`cave run distributed --full`: part "schemes" (schemes_run) and
    part "torchrun" (torchrun_run), each its own entry of the record."""
    parts = {"schemes": schemes_run, "torchrun": torchrun_run}
    if part not in parts:
        raise ValueError(f"part must be one of {FULL_RUN_PARTS}, got "
                         f"{part!r}")
    return parts[part](device, **overrides)
