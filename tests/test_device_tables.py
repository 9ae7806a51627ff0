"""The device-table layer the GPU backends share (fused_lr/backends/device_tables.py), on the CPU.

CUDA-graph capture is simulated: ``torch.cuda.is_current_stream_capturing`` is replaced by a
switch, and the layer's ``graph_device`` says the CPU is a device a graph reads, so CPU buffers
are handled as a GPU's would be. The GPU backends run with their launches stubbed (Triton's run
for real in the interpreter under ``TRITON_INTERPRET=1``): what is checked is which buffers a
step reads, writes and keeps.
"""

import gc
import inspect
import weakref

import numpy as np
import pytest
import torch

from fused_lr import FusedSGD, schedules
from fused_lr.backends import cuda as cuda_backend
from fused_lr.backends import device_tables
from fused_lr.backends import triton as triton_backend
from fused_lr.backends.device_tables import DeviceTables
from fused_lr.core import layout as L

CPU = torch.device("cpu")
CAPTURE_ERROR = (r"^fused_lr (cuda|triton) backend: .* while a CUDA graph is being captured, .*Run two eager steps "
                 r"with the same tensors and settings before capturing, and keep the gradients allocated across the "
                 r"capture")


@pytest.fixture
def capture(monkeypatch):
    """``capture[0] = True`` makes torch say a CUDA graph is being captured."""
    switch = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: switch[0])
    return switch


def _layer() -> DeviceTables:
    layer = DeviceTables("triton")
    layer.graph_device = lambda device: True  # the CPU stands in for a GPU
    return layer


# ---------------------------------------------------------------------------- the layer
def test_an_upload_during_capture_raises_one_line_and_changes_nothing(capture):
    layer = _layer()
    buf = layer.upload(np.arange(6.0).reshape(2, 3), CPU, why="first")
    capture[0] = True
    with pytest.raises(RuntimeError, match=CAPTURE_ERROR) as err:
        layer.upload(np.ones((2, 3)), CPU, buf, why="the lr changed")
    assert "\n" not in str(err.value) and "the lr changed" in str(err.value)
    with pytest.raises(RuntimeError, match=CAPTURE_ERROR):
        layer.upload(np.ones((2, 3)), CPU, why="a new plan")
    assert torch.equal(buf, torch.arange(6.0).reshape(2, 3))
    capture[0] = False
    assert layer.upload(np.ones((2, 3)), CPU, buf, why="eager") is buf and torch.equal(buf, torch.ones(2, 3))


def test_cpu_tensors_are_never_captured(capture):
    """By default only CUDA devices are captured: on the CPU (the Triton interpreter's tensors) a
    capture elsewhere neither blocks an upload nor makes anything held."""
    layer = DeviceTables("triton")
    capture[0] = True
    assert not layer.capturing(CPU)
    buf = layer.upload(np.zeros(3), CPU, why="eager")
    assert torch.equal(buf, torch.zeros(3))


def test_a_held_buffer_is_never_written_again_nor_freed(capture):
    layer = _layer()
    buf = layer.upload(np.arange(4.0), CPU, why="first")
    assert layer.upload(np.full(4, 7.0), CPU, buf, why="eager") is buf  # not held: the same address
    layer.hold(buf)
    fresh = layer.upload(np.full(4, 9.0), CPU, buf, why="eager")
    assert fresh is not buf and torch.equal(fresh, torch.full((4,), 9.0))
    assert torch.equal(buf, torch.full((4,), 7.0)) and layer.held(buf) and not layer.held(fresh)
    kept = weakref.ref(buf)
    del buf
    gc.collect()
    assert kept() is not None and torch.equal(kept(), torch.full((4,), 7.0))


def test_a_buffer_that_does_not_fit_is_replaced(capture):
    layer = _layer()
    buf = layer.upload(np.zeros((2, 3)), CPU, why="first")
    assert layer.upload(np.zeros((3, 3)), CPU, buf, why="eager").shape == (3, 3)
    assert layer.upload(np.zeros((2, 3), dtype=np.int64), CPU, buf, why="eager").dtype == torch.int64


# ---------------------------------------------------------------------------- one layer for both backends
def test_both_gpu_backends_use_the_one_layer():
    for module in (cuda_backend, triton_backend):
        assert module.DeviceTables is device_tables.DeviceTables
        for gone in ("_upload", "_capturing", "_capture_error"):
            assert not hasattr(module, gone), f"{module.__name__}.{gone}"
        source = inspect.getsource(module)
        # the uploads and the capture check are the layer's alone
        assert "pin_memory" not in source and "is_current_stream_capturing" not in source, module.__name__
    for gone in ("_hold", "_fresh_if_held"):
        assert not hasattr(cuda_backend.CudaBackend, gone)


# ---------------------------------------------------------------------------- the backends under capture
def _backend(name: str):
    """The GPU backend ``name`` on CPU tensors, the CPU standing in for a GPU: Triton's kernels run
    in the interpreter where TRITON_INTERPRET=1 made them interpreted, any other launch is a no-op."""
    from fused_lr.tools.bench.host import _stubbed

    if name == "triton":
        pytest.importorskip("triton")
        backend = triton_backend.TritonBackend()
        if backend._interpreted:
            backend.devices = frozenset({"cpu"})
        else:
            backend = _stubbed(name)
    else:
        backend = _stubbed(name)
    backend._device_tables.graph_device = lambda device: True
    return backend


def _hyper(backend) -> torch.Tensor:
    return backend._hyper if backend.name == "triton" else backend._groups.hyper


def _tensor_table(backend) -> torch.Tensor:
    return backend._tables.tensors if backend.name == "triton" else backend._tables.table


def _setup(name, lr=0.1):
    params = [torch.randn(n, dtype=torch.float64, requires_grad=True) for n in (5, 300)]
    opt = FusedSGD(params, lr=lr, momentum=0.9, max_grad_norm=1.0, schedule=schedules.Cosine(10),
                   backend="reference")
    opt._backend = backend = _backend(name)
    for p in params:
        p.grad = torch.randn_like(p)  # kept across the capture, as a captured step needs
    return params, opt, backend


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_capture_before_eager_steps_raises_and_builds_nothing(capture, name):
    params, opt, backend = _setup(name)
    capture[0] = True
    with pytest.raises(RuntimeError, match=CAPTURE_ERROR):
        opt.step()
    assert backend.rebuilds == 0 and backend._tables is None


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_a_graph_keeps_the_tables_it_captured(capture, name):
    """Triton used to rewrite its hyper rows and tensor table in place after a capture (and free
    them on a rebuild): a replayed graph then followed later eager changes, or read freed memory.
    Now, on both backends, what the captured step read keeps its contents and stays referenced,
    and eager steps after it get fresh buffers."""
    params, opt, backend = _setup(name)
    opt.step()
    opt.step()
    capture[0] = True
    opt.step()  # "captured": nothing to upload
    capture[0] = False
    hyper, table = _hyper(backend), _tensor_table(backend)
    assert backend._device_tables.held(hyper) and backend._device_tables.held(table)
    hyper_then, table_then = hyper.clone(), table.clone()
    assert float(hyper[0, L.H_LR]) == 0.1

    opt.param_groups[0]["lr"] = 0.05  # eager only: the graph keeps 0.1
    opt.step()
    assert torch.equal(hyper, hyper_then)
    assert _hyper(backend) is not hyper and float(_hyper(backend)[0, L.H_LR]) == 0.05

    for p in params:
        p.grad = torch.randn_like(p)  # new gradient tensors: a fresh table for eager steps
    opt.step()
    assert torch.equal(table, table_then)
    assert _tensor_table(backend) is not table
    assert int(_tensor_table(backend)[0, L.T_GRAD]) == params[0].grad.data_ptr()

    rebuilds = backend.rebuilds
    opt.param_groups[0]["momentum"] = 0.0  # a new plan: rebuilt, and what the graph read stays alive
    opt.step()
    assert backend.rebuilds == rebuilds + 1
    kept = weakref.ref(table)
    del table
    gc.collect()
    assert kept() is not None and torch.equal(kept(), table_then)

    capture[0] = True  # a capture that would need an upload
    opt.param_groups[0]["lr"] = 0.02
    with pytest.raises(RuntimeError, match=CAPTURE_ERROR):
        opt.step()


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_a_tensor_lr_is_read_at_its_address(capture, name):
    """A tensor lr is read on the device by every step, captured or eager, at its address: neither
    backend rewrites its tables for it (no launch or copy of its own per step), so a captured graph
    reads the lr as it is at each replay and its hyper rows stay as captured. Moving the lr's memory
    (lr.data = ...) is noticed and re-addressed, outside a capture."""
    lr = torch.tensor(0.1, dtype=torch.float64)
    params, opt, backend = _setup(name, lr=lr)
    opt.step()
    opt.step()
    hyper, lrs = _hyper(backend), _lr_table(backend)
    hyper_then, lrs_then = hyper.clone(), lrs.clone()
    assert lr.data_ptr() in lrs.flatten().tolist()
    capture[0] = True
    opt.step()
    capture[0] = False
    lr.fill_(0.02)
    opt.step()
    assert _hyper(backend) is hyper and torch.equal(hyper, hyper_then)
    assert _lr_table(backend) is lrs and torch.equal(lrs, lrs_then)
    lr.data = torch.tensor(0.03, dtype=torch.float64)  # the same tensor, its memory elsewhere
    opt.step()
    assert lr.data_ptr() in _lr_table(backend).flatten().tolist()
    assert _lr_table(backend) is not lrs and torch.equal(lrs, lrs_then)  # the captured table is kept


def _lr_table(backend) -> torch.Tensor:
    return (backend._lr if backend.name == "triton" else backend._groups.lr).table


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_an_lr_tensor_retyped_at_the_same_address_is_read_as_its_new_dtype(capture, name):
    """The lr table says at which address and as which dtype each group's lr is read: an lr whose
    memory is swapped for a float32 view of the very same bytes (lr.data = ..., same address) is
    re-addressed as float32, never read as the float64 it was."""
    buf = torch.zeros(1, dtype=torch.float64)
    buf[0] = 0.1
    lr = buf[0]
    params, opt, backend = _setup(name, lr=lr)
    opt.step()
    opt.step()
    table = _lr_table(backend).clone()
    assert table[1, 0] == lr.data_ptr() and table[0, 0] == 0  # float64 row
    lr.data = buf.view(torch.float32)[0]  # same address, now float32
    assert lr.data_ptr() == int(table[1, 0])
    opt.step()
    assert _lr_table(backend)[0, 0] == lr.data_ptr() and _lr_table(backend)[1, 0] == 0
