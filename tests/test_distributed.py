"""torch.distributed on CPU: two gloo ranks, every backend.

- DDP: every rank holds every parameter; DDP averages the gradients, FusedSGD clips and steps
  locally. The ranks must stay identical and equal one process on the same global batch.
- Sharded (ZeRO style): each rank's FusedSGD owns a disjoint shard of the parameters and
  ``process_group=`` makes the clipping norm global (all-reduce of the squared norm). Must equal
  the unsharded run; without ``process_group`` it must not (each shard would clip alone).
- A rank whose shard has no gradients still joins the norm's all-reduce (no hang).

One spawn of two processes runs all three scenarios for every backend (start-up dominates).
The model has no BatchNorm: per-rank batch statistics would make DDP differ from one process
by design. Tolerance: float64, 1e-10 relative; the ranks sum the gradients in another order
than one process does (~1e-16 per step).
"""

import datetime
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import backend_cases, batches
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fused_lr import FusedSGD, available_backends, schedules
from fused_lr.backends import devices

WORLD, STEPS = 2, 8
MAX_NORM = 0.05


def make_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)).double()


def make_opt(params, backend, **kw):
    return FusedSGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, max_grad_norm=MAX_NORM, backend=backend,
                    schedule=schedules.Cosine(STEPS), **kw)


def data():
    return list(batches(STEPS, torch.float64))  # global batches of 8


def loss_of(net, x, y):
    return nn.functional.cross_entropy(net(x), y)


def flat(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def single_process(backend):
    net = make_net()
    opt = make_opt(net.parameters(), backend)
    norms = []
    for x, y in data():
        opt.zero_grad()
        loss_of(net, x, y).backward()
        opt.step()
        norms.append(float(opt.last_grad_norm))
    return flat(net), norms


def sharded_run(rank, backend, process_group):
    net = make_net()
    params = list(net.parameters())
    owner = [i % WORLD for i in range(len(params))]
    opt = make_opt([p for p, o in zip(params, owner, strict=True) if o == rank], backend, process_group=process_group)
    norms = []
    for x, y in data():
        opt.zero_grad()
        half = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
        loss_of(net, x[half], y[half]).backward()
        for p in params:  # every rank needs the averaged gradient of the parameters it owns
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        for p, o in zip(params, owner, strict=True):  # only the owner's optimizer may see it
            if o != rank:
                p.grad = None
        opt.step()
        for p, o in zip(params, owner, strict=True):
            dist.broadcast(p.data, src=o)
        norms.append(float(opt.last_grad_norm))
    return flat(net), norms


def scenarios(rank, backend):
    result = {}
    # DDP
    net = make_net()
    ddp = DistributedDataParallel(net)
    opt = make_opt(ddp.parameters(), backend)
    for x, y in data():
        opt.zero_grad()
        half = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
        loss_of(ddp, x[half], y[half]).backward()
        opt.step()
    result["ddp"] = flat(net)
    result["ddp_backend"] = opt.backend
    # sharded, with and without a global norm
    result["sharded"], result["sharded_norms"] = sharded_run(rank, backend, dist.group.WORLD)
    result["sharded_local"], _ = sharded_run(rank, backend, None)
    # rank 1's shard never gets a gradient: its step must still join the all-reduce
    net = make_net()
    idle = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = make_opt(list(net.parameters()) if rank == 0 else [idle], backend, process_group=dist.group.WORLD)
    for x, y in data():
        opt.zero_grad()
        if rank == 0:
            loss_of(net, x, y).backward()
        opt.step()
    result["idle_rank"] = flat(net) if rank == 0 else idle.detach().clone()
    return result


def worker(rank, backends, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        result = {}
        for b in backends:
            try:
                result[b] = scenarios(rank, b)
            except Exception:  # reported by that backend's tests; the other backends still run
                result[b] = traceback.format_exc()
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def all_ranks(tmp_path_factory):
    """One spawn for every backend that runs on CPU here: starting processes costs more than
    the scenarios themselves."""
    backends = [name for name, ok in available_backends().items() if ok is True and "cpu" in devices(name)]
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(backends, str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def results(all_ranks, backend, device):
    if device != "cpu":
        pytest.skip("the gloo tests run on CPU tensors")
    got = [r[backend] for r in all_ranks]
    for rank, r in enumerate(got):
        assert not isinstance(r, str), f"rank {rank} failed:\n{r}"
    return got


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("backend,device", backend_cases())
def test_ddp_matches_single_process(all_ranks, backend, device):
    r0, r1 = results(all_ranks, backend, device)
    assert r0["ddp_backend"] == backend
    expected, norms = single_process(backend)
    assert max(norms) > MAX_NORM  # clipping was active
    assert torch.equal(r0["ddp"], r1["ddp"])
    assert rel(r0["ddp"], expected) <= 1e-10


@pytest.mark.parametrize("backend,device", backend_cases())
def test_sharded_global_norm(all_ranks, backend, device):
    r0, r1 = results(all_ranks, backend, device)
    expected, norms = single_process(backend)
    assert torch.equal(r0["sharded"], r1["sharded"])
    assert rel(r0["sharded"], expected) <= 1e-10
    # the norm used (and logged) is the whole model's on every rank
    for got in (r0["sharded_norms"], r1["sharded_norms"]):
        assert all(abs(g - n) <= 1e-12 * n for g, n in zip(got, norms, strict=True))
    # without process_group each rank clips its shard by its own norm: a different run
    assert rel(r0["sharded_local"], expected) > 1e-6


@pytest.mark.parametrize("backend,device", backend_cases())
def test_rank_without_gradients_joins_the_norm(all_ranks, backend, device):
    r0, r1 = results(all_ranks, backend, device)
    expected, _ = single_process(backend)
    assert rel(r0["idle_rank"], expected) <= 1e-10
    assert torch.equal(r1["idle_rank"], torch.zeros(3, dtype=torch.float64))
