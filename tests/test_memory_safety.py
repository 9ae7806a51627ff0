"""A kernel reads raw addresses, so it must only ever see plain strided memory of the dtype it
assumes (docs/step.md, "Memory safety"). Tensor subclasses (a wrapper made in the test, DTensor)
run on the reference with a warning naming the parameter; meta tensors raise naming it; state of
another dtype or layout is laid out like its parameter before any kernel touches it. Every case
on every backend: no crash, and the reference's numbers (float64: 1e-12 relative, the same
operations with the norm summed in another order; runs that start in float32: 1e-5)."""

import socket
import warnings

import pytest
import torch
import torch.distributed as dist
from cases import backend_cases, batches, make_model, max_rel_diff
from torch.testing._internal.two_tensor import TwoTensor

from fused_lr import FusedSGD

KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, max_grad_norm=0.5)


def _step_warned(opt):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("backend,device", backend_cases())
def test_wrapper_subclass_runs_on_the_reference(backend, device):
    base = torch.randn(7, dtype=torch.float64, device=device)
    p = torch.nn.Parameter(TwoTensor(base.clone(), base.clone()))
    plain = torch.nn.Parameter(base.clone())
    opt, ref = FusedSGD([p], backend=backend, **KW), FusedSGD([plain], backend="reference", **KW)
    for step in range(3):
        g = torch.full_like(base, 0.3 * (step + 1))
        p.grad, plain.grad = TwoTensor(g.clone(), g.clone()), g.clone()
        messages = _step_warned(opt)
        ref.step()
        if step == 0 and backend != "reference":
            assert any("param group 0, parameter 0" in m and "TwoTensor" in m for m in messages), messages
    assert opt.backend == "reference"
    assert torch.allclose(p.a, plain, rtol=1e-12, atol=0) and torch.allclose(p.b, plain, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_meta_parameters_raise_naming_the_parameter(backend, device):
    p = torch.nn.Parameter(torch.empty(4, device="meta"))
    p.grad = torch.empty(4, device="meta")
    opt = FusedSGD([torch.nn.Parameter(torch.zeros(2, device=device)), p], backend=backend, **KW) \
        if device == "meta" else FusedSGD([p], backend=backend, **KW)
    with pytest.raises(RuntimeError, match="parameter 0 is a meta tensor"):
        opt.step()
    assert not opt.state


@pytest.fixture(scope="module")
def one_rank_mesh():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    from torch.distributed.device_mesh import init_device_mesh

    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


@pytest.mark.parametrize("placement", ["shard", "replicate"])
@pytest.mark.parametrize("backend,device", [c for c in backend_cases() if c.values[1] == "cpu"])
def test_dtensor_parameters_never_reach_a_kernel_as_wrappers(backend, device, placement, one_rank_mesh):
    """The fault an FSDP2 user hit: the Numba kernels read the DTensor wrappers' addresses and
    killed both ranks. Sharded DTensors (FSDP2's placement) now run in the kernels on their local
    shards, their state DTensors too; other placements run on the reference and say so."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    place = [Shard(0)] if placement == "shard" else [Replicate()]
    full = torch.randn(8, 4, dtype=torch.float64)
    p = torch.nn.Parameter(distribute_tensor(full.clone(), one_rank_mesh, place))
    plain = torch.nn.Parameter(full.clone())
    opt, ref = FusedSGD([p], backend=backend, **KW), FusedSGD([plain], backend="reference", **KW)
    for step in range(3):
        g = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        p.grad, plain.grad = distribute_tensor(g.clone(), one_rank_mesh, place), g.clone()
        messages = _step_warned(opt)
        ref.step()
        fell_back = any("DTensor" in m for m in messages)
        assert fell_back == (placement == "replicate" and backend != "reference" and step == 0), messages
    assert opt.backend == (backend if placement == "shard" else "reference")
    assert isinstance(opt.state[p]["momentum_buffer"], DTensor)
    assert torch.allclose(p.full_tensor(), plain, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_state_of_another_dtype_is_cast_before_a_kernel_reads_it(backend, device):
    """model.double() after some float32 steps, and a float32 checkpoint loaded into a float64
    model: the momentum buffers become float64 (as torch's load_state_dict casts them), never a
    float32 buffer read through float64 addresses."""
    runs = {}
    for name in (backend, "reference"):
        model = make_model(torch.float32, device)
        opt = FusedSGD(model.parameters(), backend=name, **KW)
        for x, y in batches(2, torch.float32, device):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        model.double()
        fresh = make_model(torch.float64, device)
        fresh.load_state_dict(model.state_dict())
        fresh_opt = FusedSGD(fresh.parameters(), backend=name, **KW)
        fresh_opt.load_state_dict(opt.state_dict())
        for m, o in ((model, opt), (fresh, fresh_opt)):
            for x, y in batches(3, torch.float64, device, seed=5):
                o.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward()
                o.step()
            assert all(st["momentum_buffer"].dtype == torch.float64 for st in o.state.values())
        runs[name] = (model, fresh)
    # the two float32 steps may differ by float32 roundings (the parity matrix's 1e-5); float64 carries them on
    assert max_rel_diff(runs[backend][0], runs["reference"][0]) <= 1e-5
    assert max_rel_diff(runs[backend][1], runs["reference"][1]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("backend,device", [c for c in backend_cases() if c.values[1] == "cpu"])
def test_a_local_shard_moved_under_the_same_dtensor_is_seen(backend, device, one_rank_mesh, dtype):
    """The DTensor stays the same object while its local shard moves (``.data`` replaced: new
    memory): the next step addresses the new shard, never the freed one the plan was built on; and
    only then is a plan rebuilt (a complex shard's real view, a new object each step, used to make
    every step rebuild)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    full = torch.randn(8, 4, dtype=dtype)
    p = torch.nn.Parameter(distribute_tensor(full.clone(), one_rank_mesh, [Shard(0)]))
    plain = torch.nn.Parameter(full.clone())
    opt, ref = FusedSGD([p], backend=backend, **KW), FusedSGD([plain], backend="reference", **KW)
    builds = []
    build = opt._build_plan
    opt._build_plan = lambda grads: builds.append(1) or build(grads)
    for step in range(4):
        g = torch.randn(8, 4, dtype=dtype, generator=torch.Generator().manual_seed(step))
        p.grad, plain.grad = distribute_tensor(g.clone(), one_rank_mesh, [Shard(0)]), g.clone()
        if step == 1:
            old = p._local_tensor.data_ptr()
            p._local_tensor.data = p._local_tensor.data.clone()
            assert p._local_tensor.data_ptr() != old
        opt.step()
        ref.step()
    assert opt.backend == backend
    assert len(builds) == 2  # the first step's plan, and the one after the move
    assert torch.allclose(p.full_tensor(), plain, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_the_step_keeps_no_gradient_alive(backend, device):
    """After a step, ``zero_grad(set_to_none=True)`` frees every gradient, as with torch's optimizers:
    the gradients' memory is free for the next forward. Checked for gradients the kernels read in
    place, for one staged into a copy (other strides than its parameter), and for a step that raised."""
    import gc
    import weakref

    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64, device=device)) for _ in range(3)]
    opt = FusedSGD(params, backend=backend, error_if_nonfinite=True, **KW)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        if step == 1:  # the same values with other strides: staged into a copy laid out like the parameter
            params[0].grad = params[0].grad.t().contiguous().t()
        if step == 2:
            params[1].grad[0, 0] = float("nan")
        refs = [weakref.ref(p.grad) for p in params]
        if step == 2:
            with pytest.raises(RuntimeError, match="non-finite"):
                opt.step()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert [r() is None for r in refs] == [True] * len(params), f"step {step}"
