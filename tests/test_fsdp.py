"""FSDP2 (torch.distributed.fsdp.fully_shard) on two gloo ranks, every CPU backend: the fused
step runs on each rank's local shards (never through the DTensor wrappers), the clipping norm is
the whole model's (one all-reduce over the mesh, found from the DTensors), and the result equals
torch's optimizer + clip_grad_norm_ + LambdaLR on the same sharded model. Checkpoints through
torch.distributed.checkpoint resume mid-schedule as if never stopped.

Shards are uneven (7 rows over 2 ranks, a 3-element bias). Tolerance: float64, 1e-9 relative
(docs/step.md, "Numerics"): the ranks add their squared norms in another order than torch's
DTensor reduction does.
"""

import datetime
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.optim import lr_scheduler as lrs

from fused_lr import FusedAdamW, FusedSGD, available_backends, schedules
from fused_lr.backends import devices

WORLD, STEPS, SAVE_AT, MAX_NORM = 2, 20, 8, 0.5
SCHEDULE = schedules.Warmup(3, schedules.Cosine(STEPS))
OPTIMIZERS = {
    "sgd": (FusedSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "adamw": (FusedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}


def sharded_net():
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(net)
    return net


def data(rank):
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batches, as in data-parallel training
    return [(torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
            for _ in range(STEPS)]


def train(net, opt, batches, reference=None):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if reference is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), MAX_NORM)
        opt.step()
        if reference is not None:
            reference.step()


def local(net):
    return torch.cat([p.to_local().detach().reshape(-1) for p in net.parameters()])


def scenario(rank, backend, name, store):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    ours, theirs, kw = OPTIMIZERS[name]
    batches = data(rank)
    ref_net = sharded_net()
    ref_opt = theirs(ref_net.parameters(), **kw)
    train(ref_net, ref_opt, batches, lrs.LambdaLR(ref_opt, SCHEDULE))

    net = sharded_net()
    opt = ours(net.parameters(), backend=backend, max_grad_norm=MAX_NORM, schedule=SCHEDULE, **kw)
    train(net, opt, batches[:SAVE_AT])
    ran = opt.backend
    dcp.save({"model": net.state_dict(), "optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=store)
    resumed = sharded_net()
    opt2 = ours(resumed.parameters(), backend=backend, max_grad_norm=MAX_NORM, schedule=SCHEDULE, **kw)
    state = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, opt2)}
    dcp.load(state, checkpoint_id=store)
    resumed.load_state_dict(state["model"])
    set_optimizer_state_dict(resumed, opt2, state["optim"])
    train(resumed, opt2, batches[SAVE_AT:])
    dtensor_state = all(type(v).__name__ == "DTensor" for st in opt2.state.values() for k, v in st.items()
                        if k != "step")
    return dict(ours=local(resumed), torch=local(ref_net), ran=ran, dtensor_state=dtensor_state)


def worker(rank, backends, tmp, out):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        result = {}
        for b in backends:
            for name in OPTIMIZERS:
                try:
                    result[f"{b}-{name}"] = scenario(rank, b, name, f"{tmp}/ckpt-{b}-{name}")
                except Exception:  # reported by that case's test; the others still run
                    result[f"{b}-{name}"] = traceback.format_exc()
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def all_ranks(tmp_path_factory):
    backends = [n for n, ok in available_backends().items() if ok is True and "cpu" in devices(n)]
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(worker, args=(backends, str(tmp), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


CASES = [pytest.param(b, n, id=f"{b}-{n}") for b in ("reference", "numba", "triton") for n in OPTIMIZERS]


@pytest.mark.parametrize("backend,name", CASES)
def test_fsdp2_equals_torch_and_resumes_through_dcp(all_ranks, backend, name):
    if available_backends()[backend] is not True or "cpu" not in devices(backend):
        pytest.skip(f"{backend} does not run on CPU tensors here")
    for rank, r in enumerate(all_ranks):
        got = r[f"{backend}-{name}"]
        assert not isinstance(got, str), f"rank {rank} failed:\n{got}"
        assert got["ran"] == backend  # on the local shards, not a fallback
        assert got["dtensor_state"]
        scale = got["torch"].abs().max()
        assert float((got["ours"] - got["torch"]).abs().max() / scale) <= 1e-9, rank
    # uneven shards: the ranks hold different numbers of elements
    assert all_ranks[0][f"{backend}-{name}"]["ours"].numel() != all_ranks[1][f"{backend}-{name}"]["ours"].numel()


