"""kdloss.torch under torch.distributed: DDP over 2 gloo processes equals one process on the full batches.

Each process takes its shard of every batch. The shards hold different numbers of counted rows (labels equal
to ignore_index are skipped), so dividing each shard's loss by its *own* count would weight the rows wrongly;
the loss is instead normalised by the *global* count, obtained with an all_reduce.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = torch.distributed
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

from kdloss.torch import DistillationLoss  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

WORLD_SIZE = 2
STEPS = 4
BATCH, SEQ, FEATURES, CLASSES = 7, 5, 4, 9  # 7 sequences: shards of 4 and 3
IGNORE = -100
LR = 0.5
TIMEOUT_S = 45.0
F64 = torch.float64


def make_problem() -> tuple[torch.nn.Module, torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The same student (initial weights), frozen teacher and batches in every process."""
    torch.manual_seed(11)
    student = torch.nn.Sequential(torch.nn.Linear(FEATURES, 12), torch.nn.Tanh(), torch.nn.Linear(12, CLASSES)).to(F64)
    teacher = torch.nn.Linear(FEATURES, CLASSES).to(F64).requires_grad_(False)
    gen = torch.Generator().manual_seed(12)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, SEQ, FEATURES, generator=gen, dtype=F64)
        y = torch.randint(0, CLASSES, (BATCH, SEQ), generator=gen)
        y[torch.rand(BATCH, SEQ, generator=gen) < 0.3] = IGNORE  # counts now differ between shards
        batches.append((x, y))
    return student, teacher, batches


def loss_fn() -> DistillationLoss:
    # One kdloss thread per process: two processes already use both cores of a small CI machine.
    return DistillationLoss(temperature=2.0, alpha=0.4, num_threads=1)


def train_single_process() -> tuple[list[torch.Tensor], list[float]]:
    """The reference: one process, full batches, the plain "mean" reduction."""
    student, teacher, batches = make_problem()
    kd = loss_fn()
    opt = torch.optim.SGD(student.parameters(), lr=LR)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = kd(student(x), teacher(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return [p.detach().clone() for p in student.parameters()], losses


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One DDP process: trains on its shard of every batch and saves its final parameters."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=30),
    )
    try:
        student, teacher, batches = make_problem()
        model = DistributedDataParallel(student)
        kd = loss_fn()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        losses = []
        for x, y in batches:
            x_shard = torch.tensor_split(x, world_size)[rank]
            y_shard = torch.tensor_split(y, world_size)[rank]

            # The global number of counted rows (tokens), summed over all processes.
            count = (y_shard != IGNORE).sum()
            dist.all_reduce(count)

            # This shard's part of the full-batch mean: sum of its row losses / global count. The parts of
            # all processes add up to the full-batch loss, and their gradients to the full-batch gradient.
            loss = kd(model(x_shard), teacher(x_shard), y_shard, normalizer=count)

            # DDP *averages* the gradients over the processes (it divides their sum by world_size), but we
            # want their sum. Scaling the loss by world_size cancels that division exactly: with W = 2 both
            # the factor and the division are exact in binary floating point. (Equivalently: normalizer=
            # count / world_size.)
            opt.zero_grad()
            (loss * world_size).backward()
            opt.step()

            # For logging: the full-batch loss is the sum of the parts.
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item())
        torch.save(
            {"params": [p.detach().clone() for p in model.module.parameters()], "losses": losses},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()
    # With torch 2.13, a DDP process over gloo aborts now and then ("terminate called without an active
    # exception", SIGABRT) while the interpreter shuts down, after all its work is done and saved; it does so
    # without kdloss too (about 1 run in 10 here). Leave without that shutdown.
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_workers(out_dir: Path) -> None:
    """Spawn the processes, wait at most TIMEOUT_S, and never leave one behind."""
    context = torch.multiprocessing.start_processes(
        _worker,
        args=(WORLD_SIZE, _free_port(), str(out_dir)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # join() returns True once all processes exited cleanly and raises if one of them failed.
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)


def test_ddp_with_global_count_equals_single_process(tmp_path):
    _run_workers(tmp_path)
    ref_params, ref_losses = train_single_process()

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    # Sanity: the shards really did count different numbers of rows in the first batch.
    _, _, batches = make_problem()
    counts = [int((part != IGNORE).sum()) for part in torch.tensor_split(batches[0][1], WORLD_SIZE)]
    assert counts[0] != counts[1]

    for result in results:
        for got, want in zip(result["losses"], ref_losses):
            assert got == pytest.approx(want, rel=1e-12)
        assert len(result["params"]) == len(ref_params)
        for got, want in zip(result["params"], ref_params):
            err = (got - want).abs().max().item()
            assert err <= 1e-12 * want.abs().max().item(), f"parameters differ by {err:.3e}"
    # And the run moved the parameters (a no-op training would pass the checks above trivially).
    initial = [p.detach() for p in make_problem()[0].parameters()]
    assert max((p - q).abs().max().item() for p, q in zip(ref_params, initial)) > 1e-3
