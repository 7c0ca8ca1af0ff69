"""Data-parallel and sharded training on ``torch.distributed``, launched with ``torchrun``.

Data parallel (the default path; ``minillm-func train`` under ``torchrun`` uses it)::

    from minillm_func import distributed as dist_mf

    dist_mf.init_from_env()                            # no-op in a single process
    trainer = mf.create_trainer("pretrain", model, grad_sync=dist_mf.make_grad_sync())
    batches = mf.Batches(data, 32, seed=0, rank=dist_mf.rank(), world_size=dist_mf.world_size())  # 32: GLOBAL
    state = trainer.fit(trainer.init(model.init(0)), batches, num_steps=1000, out_dir="runs/x")
    dist_mf.shutdown()

Why it is exact: every loss in this library returns the micro-batch's *summed*
loss and its count (tokens, or pairs for DPO), and ``make_train_step`` applies
``sync`` to the unnormalised gradient before it divides by the window's count.
``make_grad_sync`` sums gradients, counts and loss sums over ranks (SUM, not
AVG: the step itself normalises by the now *global* count), so ``N`` ranks
holding disjoint slices of a global batch take the update one process takes on
the whole batch -- token-weighted, whatever the ranks' token counts -- up to
floating-point summation order. Every rank applies the same summed gradient to
the same params, so the replicas stay bit-identical and checkpoints hold plain
full tensors (only rank 0 writes; ``Trainer.fit`` sees to that).

Sharded (FSDP-style, ZeRO-3 layout) on DTensor::

    mesh = dist_mf.device_mesh()
    state = dist_mf.shard_state(trainer.init(params), mesh)     # params, AdamW moments, accumulator: Shard(0)
    step = dist_mf.make_sharded_step(trainer)
    state, metrics = step(state, batch)                          # same numbers as the data-parallel step
    dist_mf.save_checkpoint("runs/x/checkpoint", state, meta)    # gathers full tensors, rank 0 writes

The loss all-gathers every parameter (``DTensor.full_tensor``) and declares the
gradient of the gathered tensor ``Partial`` (a per-rank partial sum), so
autograd's backward through the gather is a reduce-scatter: each rank gets the
summed gradient of its own shard only, and AdamW (``minillm_func.optim``,
elementwise) updates only that shard. See ``docs/distributed.md`` for what is
and is not sharded and why this path uses ``torch.autograd.grad``, not
``torch.func``.

Failures: every collective here raises :class:`DistributedError` when a peer
dies (at once: its sockets close) or stops answering (after the process group's
timeout, ``init_from_env(timeout_s=...)``, plus well under a second). On CPU
(gloo) the collectives this module launches itself -- the gradient sync, the
sharded step's count sync, :func:`all_reduce_sum`, :func:`barrier` -- wait with
``Work.wait(timeout=...)``, so the bound is that timeout for the whole call;
the collectives DTensor issues (all-gather, reduce-scatter) are bounded by
gloo's own per-operation timeout, which is the same number.
"""
from __future__ import annotations

import datetime
import os
import time
from typing import Callable

import torch
import torch.distributed as dist

from . import tree as T

__all__ = [
    "DistributedError", "init_from_env", "rank", "world_size", "is_main", "barrier", "shutdown",
    "all_reduce_sum", "make_grad_sync", "device_mesh", "shard_state", "unshard_state",
    "gather_params", "make_sharded_step", "save_checkpoint",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_TIMEOUT_S: float | None = None  # init_from_env's timeout_s, for groups whose own timeout cannot be read


class DistributedError(RuntimeError):
    """A collective failed: a peer process crashed, or stopped answering for longer than the timeout."""


# --------------------------------------------------------------------------- process group


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(backend: str | None = None, timeout_s: float = 60) -> bool:
    """Join the default process group that ``torchrun`` describes in the environment.

    Returns False (and does nothing) in a single process (``WORLD_SIZE`` unset or 1),
    True once the group is up (also when it already was). ``backend`` defaults to
    ``"nccl"`` when CUDA is available (each process then uses GPU ``LOCAL_RANK``),
    else ``"gloo"``.

    ``timeout_s`` bounds every collective (the CLI's ``--dist-timeout``): when a
    peer crashes, the others fail at once (its sockets close); when a peer is
    alive but stops answering (a hang, a deadlock, a SIGSTOP), they fail after
    ``timeout_s`` seconds (measured: ``timeout_s`` + under 0.1 s on gloo). Either way
    the error is a :class:`DistributedError` naming the rank, the collective and
    the timeout, instead of a wait forever. On gloo the collectives of this module
    wait with ``Work.wait(timeout=timeout_s)`` and gloo's own per-operation timeout
    is the same number; on NCCL the bound is enforced by torch's watchdog, which
    aborts the process. Set it above the longest time one rank may legitimately
    spend between two collectives while the others wait (an evaluation or a
    checkpoint that only some ranks do, a slow first step).
    """
    global _TIMEOUT_S
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"init_from_env: timeout_s must be a positive number of seconds, got {timeout_s!r}.")
    if _initialized():
        return True
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1:
        return False
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise DistributedError(
            f"init_from_env: WORLD_SIZE={n} but {', '.join(missing)} not set. Launch with torchrun, which sets "
            "them all, e.g.  torchrun --standalone --nproc_per_node=2 -m minillm_func.cli train ...")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    _TIMEOUT_S = float(timeout_s)
    return True


def rank() -> int:
    """This process's rank in the default group; 0 when not distributed."""
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """Processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that logs and writes files."""
    return rank() == 0


def barrier(group=None) -> None:
    """Wait until every rank (of ``group``, default: all) gets here (no-op in a single process).

    Raises :class:`DistributedError` when a peer crashed or did not arrive within the timeout.
    """
    if _initialized():
        _collective(lambda: [dist.barrier(group=group, async_op=True)], "barrier", group=group,
                    timed="nccl" not in _backend(group))


def shutdown() -> None:
    """Leave the process group (no-op when there is none)."""
    if _initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """``tensor`` summed over the ranks of ``group`` (default: all), as a new tensor.

    ``tensor`` itself is not modified; in a single process (no process group) the
    result is a copy of it. Every rank must call this with a tensor of the same
    shape and dtype. Like the gradient sync, it raises :class:`DistributedError`
    when a peer crashed or stopped answering for the timeout. For summing a few
    host-side statistics over ranks, e.g. an evaluation's loss sums and counts::

        sums = all_reduce_sum(torch.tensor([count, loss_sum], dtype=torch.float64))
    """
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    if _initialized():
        _collective(lambda: [dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group, async_op=True)],
                    "all_reduce_sum", group=group, timed=out.device.type == "cpu")
    return out


# --------------------------------------------------------------------------- failures


class _Expired(Exception):
    """Our own ``Work.wait`` deadline passed."""


# What the backends say, verbatim (torch 2.13's bundled gloo; NCCL's watchdog). gloo's
# "Application timeout caused pair closure" carries neither "gloo" nor "Timed out": it is what every
# *other* pending operation of the group reports once one of them has timed out and closed the pairs.
_TIMEOUT_TEXT = ("Timed out", "timed out", "Application timeout caused pair closure",
                 "Watchdog caught collective operation timeout")
_GONE_TEXT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")
_COMM_TEXT = _TIMEOUT_TEXT + _GONE_TEXT + ("gloo", "Gloo", "NCCL")


def _is_comm_error(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in _COMM_TEXT)


def _backend(group=None) -> str:
    try:
        return str(dist.get_backend(group))
    except Exception:  # noqa: BLE001 -- a group of another kind; assume it can be waited on with a timeout
        return "gloo"


def _group_timeout_s(group=None) -> float:
    """The timeout of ``group`` (the default group's when None) in seconds: what gloo's operations use."""
    pg = group if group is not None else dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return pg._get_backend(torch.device(device)).options._timeout.total_seconds()
        except Exception:  # noqa: BLE001 -- private API: no backend for this device, or its shape changed
            continue
    return _TIMEOUT_S if _TIMEOUT_S is not None else dist.default_pg_timeout.total_seconds()


def _fail(what: str, e: BaseException, *, timeout_s: float | None = None, elapsed: float | None = None,
          timed_out: bool = False) -> DistributedError:
    """The error that teaches: which rank, which collective, which timeout, what happened, what to do."""
    if timeout_s is None:
        timeout_s = _group_timeout_s() if _initialized() else (_TIMEOUT_S or 60.0)
    text = str(e).strip() or type(e).__name__
    said = ("Backend said: nothing yet (this rank's own wait, Work.wait(timeout), expired first)."
            if isinstance(e, _Expired) else f"Backend said: {text}")
    after = f" after {elapsed:.1f} s" if elapsed is not None else ""
    raise_it = ("If the steps are legitimately that slow (an evaluation or a checkpoint that only some ranks "
                "do, a slow first step), raise the timeout: --dist-timeout SECONDS on the command line, "
                "init_from_env(timeout_s=...) in a script.")
    if timed_out or isinstance(e, _Expired) or any(s in text for s in _TIMEOUT_TEXT):
        cause = (f"a peer stopped answering for {timeout_s:g} s (the process group's timeout): it hangs, "
                 "deadlocks, is stopped, or is still busy elsewhere.")
        advice = raise_it
    elif any(s in text for s in _GONE_TEXT):
        cause = ("a peer process closed its connection: it crashed, was killed (out of memory?) or gave up on "
                 f"its own timeout ({timeout_s:g} s).")
        advice = ""
    else:
        cause = f"a peer process crashed or stopped answering within the timeout ({timeout_s:g} s)."
        advice = raise_it
    return DistributedError(
        f"{what} failed on rank {rank()} of {world_size()}{after}: {cause} Check the other ranks' output "
        f"for the first error; this rank stops here. {advice}{' ' if advice else ''}{said}")


def _guard(fn: Callable, what: str, *args, **kwargs):
    """Run ``fn``, turning a backend's communication error into a :class:`DistributedError`.

    For collectives issued inside ``fn`` (by DTensor) whose waits we do not own: gloo's own
    per-operation timeout (the group's) bounds them.
    """
    try:
        return fn(*args, **kwargs)
    except DistributedError:
        raise
    except RuntimeError as e:
        if _is_comm_error(e):
            raise _fail(what, e) from e
        raise


_DRAIN_S = 2.0  # after a failure: how long to let the group's other operations end (see _collective)


def _collective(launch: Callable[[], list], what: str, *, group=None, timed: bool = True) -> None:
    """Start collectives (``launch`` issues them with ``async_op=True`` and returns the works) and wait
    for all of them; ``timed``: at most the group's timeout for the whole call.

    Why a deadline of our own when gloo has one: gloo's timeout is per send or receive inside an
    operation, an operation queued behind another starts its clock late, and the failure often
    surfaces in another operation as "Application timeout caused pair closure". ``Work.wait(timeout=)``
    bounds what the caller waits, whatever the backend does. It is not used on NCCL (``timed=False``):
    there it would block the host until the GPU finishes; NCCL's watchdog enforces the timeout.

    ``Work.wait(timeout=)`` does not cancel the operation, and a process that exits while gloo's
    worker thread still runs one dies with "terminate called without an active exception" (SIGABRT).
    So after a failure we give the launched operations up to ``_DRAIN_S`` to end: gloo's own timeout
    is the same number and ends them a few milliseconds later, with its own message, which we report.
    """
    timeout_s = _group_timeout_s(group)
    t0 = time.monotonic()
    works: list = []
    expired = False
    try:
        works = launch()
        for w in works:
            if not timed:
                w.wait()
                continue
            left = timeout_s - (time.monotonic() - t0)
            # timedelta(0) would mean "no timeout": from 1 ms, a work already done returns at once
            try:
                done = w.wait(timeout=datetime.timedelta(seconds=max(left, 1e-3)))
            except RuntimeError as e:  # torch 2.13 gloo: RuntimeError("Operation timed out!")
                if not w.is_completed() and "Operation timed out" in str(e):
                    expired = True
                    break
                raise
            if done is False and not w.is_completed():  # other backends may report it this way
                expired = True
                break
    except DistributedError:
        raise
    except RuntimeError as e:
        if not _is_comm_error(e):
            raise
        if timed:
            _drain(works)
        raise _fail(what, e, timeout_s=timeout_s, elapsed=time.monotonic() - t0) from e
    if expired:  # outside the except blocks: the traceback shows the backend's error, if any, and ours
        cause = _drain(works)
        raise _fail(what, cause if cause is not None else _Expired(), timeout_s=timeout_s,
                    elapsed=time.monotonic() - t0, timed_out=True) from cause


def _drain(works: list) -> BaseException | None:
    """Wait up to ``_DRAIN_S`` in all for ``works`` to end; the first backend error among them, if any."""
    first, t0 = None, time.monotonic()
    for w in works:
        try:
            w.wait(timeout=datetime.timedelta(seconds=max(_DRAIN_S - (time.monotonic() - t0), 1e-3)))
        except RuntimeError as e:
            if first is None and "Operation timed out" not in str(e):
                first = e
    return first


def _require_group(who: str) -> None:
    if not _initialized():
        raise DistributedError(
            f"{who}: torch.distributed is not initialised. Call minillm_func.distributed.init_from_env() under "
            "torchrun first, or train in one process without it (grad_sync=None).")


# --------------------------------------------------------------------------- data parallel


def _bucket_plan(leaves: list, bucket_bytes: int) -> list[list[int]]:
    """Leaf indices grouped into buckets of one dtype and device, each at most ``bucket_bytes``
    (a single larger leaf gets a bucket of its own); leaf order is kept within a bucket."""
    open_bucket: dict = {}  # (dtype, device) -> (indices, bytes)
    plan: list[list[int]] = []
    for i, x in enumerate(leaves):
        key, size = (x.dtype, x.device), x.numel() * x.element_size()
        idx, used = open_bucket.get(key, ([], 0))
        if idx and used + size > bucket_bytes:
            plan.append(idx)
            idx, used = [], 0
        open_bucket[key] = (idx + [i], used + size)
    plan.extend(idx for idx, _ in open_bucket.values())
    return plan


def make_grad_sync(group=None, bucket_bytes: int = 25 * 2**20) -> Callable:
    """``sync(grads, count, loss_sum) -> (grads, count, loss_sum)`` summed over the ranks of ``group``.

    Hand it to ``create_trainer(..., grad_sync=make_grad_sync())``. The gradient
    leaves are copied into a few contiguous buffers (one dtype and device each, at
    most ``bucket_bytes``; 25 MiB as in DDP), and each buffer is one
    ``all_reduce(SUM)``, all launched before any is awaited; the count and the
    loss sum ride in a float64 buffer (appended to a float64 gradient bucket when
    there is one; float64 holds any token count exactly). The result has the
    structure, dtypes and devices of the inputs, which are not modified.

    SUM, not AVG: the step divides by the window's count *after* this, and that
    count is now the global one, so the update is the full batch's token-weighted
    mean. Averaging gradients instead would weight each rank's tokens by
    ``1 / (its own count)`` -- a mean of means, wrong when ranks hold different
    numbers of tokens.

    Costs: one copy of the gradients in and out of the buffers, and a collective
    on every micro-step (also inside an accumulation window, where summing once
    at the window's end would do; ``make_train_step`` syncs per micro-batch).
    """
    if not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise ValueError(f"make_grad_sync: bucket_bytes must be a positive int, got {bucket_bytes!r}.")

    def sync(grads, count, loss_sum):
        _require_group("make_grad_sync")
        leaves = T.leaves(grads)
        plan = _bucket_plan(leaves, bucket_bytes)
        # torch.cat always allocates, so every buffer below is ours: reducing it in place
        # cannot touch the caller's gradient tensors.
        buffers = [torch.cat([leaves[i].detach().reshape(-1) for i in idx]) for idx in plan]
        device = leaves[0].device if leaves else torch.as_tensor(count).device
        scalars = torch.stack([torch.as_tensor(count).detach().to(device, torch.float64),
                               torch.as_tensor(loss_sum).detach().to(device, torch.float64)])
        host = next((j for j, b in enumerate(buffers) if b.dtype == torch.float64 and b.device == device), None)
        if host is None:
            buffers.append(scalars)
            host = len(buffers) - 1
        else:
            buffers[host] = torch.cat([buffers[host], scalars])

        _collective(lambda: [dist.all_reduce(b, op=dist.ReduceOp.SUM, group=group, async_op=True)
                             for b in buffers],
                    "make_grad_sync: all_reduce of the gradients", group=group, timed=device.type == "cpu")
        out: list = [None] * len(leaves)
        for idx, buf in zip(plan, buffers):
            for i, piece in zip(idx, buf[: sum(leaves[i].numel() for i in idx)].split(
                    [leaves[i].numel() for i in idx])):
                out[i] = piece.view(leaves[i].shape)
        total = buffers[host][-2:]
        return (T.unflatten_like(grads, out), total[0].to(torch.as_tensor(count).dtype),
                total[1].to(torch.as_tensor(loss_sum).dtype))

    return sync


# --------------------------------------------------------------------------- sharded (FSDP-style) on DTensor


def device_mesh(device_type: str | None = None):
    """A 1-D ``DeviceMesh`` over every rank of the default group ("cuda" with NCCL, else "cpu")."""
    from torch.distributed.device_mesh import init_device_mesh

    _require_group("device_mesh")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (world_size(),))


def _is_dtensor(x) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def shard_state(tree, mesh=None):
    """Every tensor leaf with at least one dimension as a ``Shard(0)`` DTensor over the 1-D ``mesh``.

    Use it on a whole ``TrainState``: params, AdamW's ``mu`` / ``nu``, the
    accumulator's gradient sum and frozen extras (the DPO reference) are split
    along their first dimension, each rank keeping about ``1/N`` of each (uneven
    sizes are fine). 0-d leaves (step counters, the loss scale, the token sum)
    stay plain tensors, replicated. The values are rank 0's
    (``distribute_tensor`` scatters from it). Every rank must call this; each
    must hold the full tree first, so the peak memory at start-up is unsharded.
    """
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = device_mesh() if mesh is None else mesh
    return T.tree_map(lambda x: _guard(distribute_tensor, "shard_state: scatter", x, mesh, [Shard(0)])
                      if isinstance(x, torch.Tensor) and not _is_dtensor(x) and x.dim() > 0 else x, tree)


def unshard_state(tree):
    """DTensor leaves gathered into full plain tensors; other leaves unchanged.

    A collective: every rank must call it, with the same tree.
    """
    return _unshard(tree, "unshard_state: all_gather")


def _unshard(tree, what: str):
    return T.tree_map(lambda x: _guard(x.full_tensor, what) if _is_dtensor(x) else x, tree)


def gather_params(loss_fn: Callable) -> Callable:
    """Wrap a loss ``(params, batch, extras) -> ...`` to take sharded params.

    Each DTensor param is all-gathered with ``full_tensor(grad_placements=[Partial()])``:
    the forward sees plain full tensors, and the gradient of the gathered
    tensor is declared a per-rank partial sum, so the backward of the gather
    reduce-scatters it -- the param's gradient comes back as a ``Shard(0)`` DTensor
    holding the sum over ranks of this rank's slice. DTensors in ``extras``
    (e.g. the DPO reference) are gathered without a gradient.
    """
    from torch.distributed.tensor import Partial

    def full(x, placements):
        return x.full_tensor(grad_placements=placements) if _is_dtensor(x) else x

    def sharded_loss(params, batch, extras):
        full_params = T.tree_map(lambda p: full(p, [Partial()]), params)
        with torch.no_grad():
            full_extras = T.tree_map(lambda x: full(x, None), extras)
        return loss_fn(full_params, batch, full_extras)

    return sharded_loss


def _make_count_sync(group=None) -> Callable:
    """Sum count and loss sum over ranks; gradients pass through (the reduce-scatter already summed them)."""

    def sync(grads, count, loss_sum):
        buf = torch.stack([torch.as_tensor(count).to(torch.float64),
                           torch.as_tensor(loss_sum).detach().to(torch.float64)])
        _collective(lambda: [dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True)],
                    "make_sharded_step: all_reduce of the token count", group=group, timed=buf.device.type == "cpu")
        return grads, buf[0].to(torch.as_tensor(count).dtype), buf[1].to(torch.as_tensor(loss_sum).dtype)

    return sync


def _localise(tree):
    """Replicated DTensors (counters, metrics) back to plain tensors: every rank holds the same value."""
    from torch.distributed.tensor import Replicate

    def one(x):
        if _is_dtensor(x) and all(isinstance(p, Replicate) for p in x.placements):
            return x.to_local()
        return x

    return T.tree_map(one, tree)


def make_sharded_step(trainer, *, group=None) -> Callable:
    """The pure ``step(state, batch) -> (new_state, metrics)`` of ``trainer``, over a :func:`shard_state` state.

    Built from the trainer's own loss, optimizer chain (clipping, AdamW),
    schedule, accumulation and loss scaling with ``make_train_step``; the
    differences are the loss (wrapped by :func:`gather_params`) and the sync
    (only the count and the loss sum are all-reduced: the gradients arrive
    reduce-scattered). Gradients, the accumulator and the optimizer update stay
    sharded: AdamW is elementwise and runs on each rank's shard; the global
    gradient norm for clipping is reduced by DTensor. Metrics and counters come
    back as plain tensors, equal on every rank.

    It differentiates with ``torch.autograd.grad``: ``torch.func.grad`` unwraps
    DTensors to plain tensors (see ``docs/distributed.md``). ``batch`` is this
    rank's slice of the global batch, as in data parallelism.
    """
    from .step import make_train_step

    inner = make_train_step(gather_params(trainer.loss_fn), trainer.optimizer,
                            accumulation_steps=trainer.accumulation_steps,
                            loss_scaling=trainer.loss_scaling, lr_schedule=trainer.lr_schedule,
                            grad_path="autograd", sync=_make_count_sync(group))

    def step(state, batch):
        # the all-gathers and reduce-scatters are DTensor's: gloo's per-operation timeout bounds them
        new_state, metrics = _guard(inner, "make_sharded_step: an all-gather or reduce-scatter", state, batch)
        return _localise(new_state), _localise(metrics)

    return step


def save_checkpoint(path, state, *, meta: dict | None = None) -> None:
    """Gather a (possibly sharded) state to full tensors on every rank; rank 0 writes it; all wait.

    The checkpoint is the same as one process writes, so it resumes with any
    number of processes: ``checkpoint.load`` on every rank, then :func:`shard_state`.
    The other ranks wait for rank 0's write in a barrier bounded by the process
    group's timeout: a write that takes longer fails them with :class:`DistributedError`.
    """
    from . import checkpoint

    full = _unshard(state, "save_checkpoint: all_gather of the state")
    if is_main():
        checkpoint.save(path, full, meta=meta)
    if _initialized():  # everyone waits until rank 0 has written
        _collective(lambda: [dist.barrier(async_op=True)], "save_checkpoint: barrier after rank 0 wrote",
                    timed="nccl" not in _backend())
