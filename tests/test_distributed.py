"""rnnkern.nn modules under DistributedDataParallel: 2 CPU processes (gloo) train on halves of
a batch and must produce the gradients of one process training on the whole batch."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import rnnkern.nn
from tests.tolerances import assert_close

WORLD = 2
GLOBAL_BATCH = 6
STEPS = 2


class SmallModel(nn.Module):
    """(B, T, 5) -> (B, T, 1) through an rnnkern LSTM and an rnnkern Mamba block."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = rnnkern.nn.LSTM(5, 8, batch_first=True)
        self.mamba = rnnkern.nn.Mamba(8, d_state=4, d_conv=3, expand=2)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        return self.head(y + self.mamba(y))


def _model() -> SmallModel:
    torch.manual_seed(0)
    return SmallModel().double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 7, 5, generator=gen, dtype=torch.float64)
    return x, torch.randn(STEPS, GLOBAL_BATCH, 7, 1, generator=gen, dtype=torch.float64)


def _train(model: nn.Module, trained: nn.Module, rows: slice) -> list[dict[str, torch.Tensor]]:
    """STEPS SGD steps of `model` (maybe DDP-wrapped `trained`) on `rows` of each batch; the
    gradients of every step."""
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    x, target = _data()
    grads = []
    for step in range(STEPS):
        optimizer.zero_grad()
        F.mse_loss(model(x[step, rows]), target[step, rows]).backward()
        grads.append({name: p.grad.clone() for name, p in trained.named_parameters()})
        optimizer.step()
    return grads


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        share = GLOBAL_BATCH // WORLD
        grads = _train(DistributedDataParallel(model), model, slice(rank * share, (rank + 1) * share))
        if rank == 0:
            torch.save({"grads": grads, "params": dict(model.named_parameters())}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_gradients_equal_single_process(tmp_path):
    out_file = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True)
    distributed = torch.load(out_file)
    model = _model()
    single = _train(model, model, slice(None))
    assert len(distributed["grads"]) == STEPS
    for step, (got, want) in enumerate(zip(distributed["grads"], single)):
        assert got.keys() == want.keys()
        for name in want:
            assert_close(got[name], want[name], torch.float64, f"step {step} grad of {name}")
    for name, param in model.named_parameters():
        assert_close(distributed["params"][name], param, torch.float64, f"{name} after training")
