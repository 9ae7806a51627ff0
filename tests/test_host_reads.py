"""No host read in a step (docs/step.md, "Skipped steps (AMP)"): with clipping and a GradScaler, the
core and the GPU backends' host sides never read a tensor's value (`bool`, `float`, `int`,
`.item()`, `.tolist()`, `.cpu()`, `.numpy()`), which on a GPU would be a device sync every step and an
error inside CUDA-graph capture. Only ``error_if_nonfinite=True`` reads the norm, and says so.

Run on the CPU: the reads are counted by instrumenting torch.Tensor, attributed to the calling
file; the GPU backends run as the Triton interpreter and the CUDA host twin (tests/test_cuda_host.py).
The CPU backends may read CPU tensors (no device to sync with): their own files are not counted,
the core is."""

import sys
from pathlib import Path

import pytest
import torch
from cases import backend_cases
from test_cuda_host import generated, on_twin, twin_lib  # noqa: F401 (fixtures of the CUDA host twin)

import fused_lr
from fused_lr import FusedAdamW, FusedSGD

PKG = Path(fused_lr.__file__).parent
WATCHED = (str(PKG / "core"), str(PKG / "backends" / "triton.py"), str(PKG / "backends" / "cuda.py"))
READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "cpu", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    seen = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(WATCHED):
                seen.append(f"{_name} in {Path(caller.co_filename).name}:{caller.co_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return seen


def _amp_steps(opt, params, scaler, n=4, bad_at=2):
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        loss = sum((p * torch.randn(p.shape, generator=gen)).sum() for p in params)
        if i == bad_at:  # an overflow: the scaler skips this step
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)


def _params():
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((6, 4), (9,))]


CASES = [(FusedSGD, dict(lr=0.1, momentum=0.9)), (FusedAdamW, dict(lr=0.01))]


@pytest.mark.parametrize("cls,kw", CASES, ids=["sgd", "adamw"])
@pytest.mark.parametrize("backend,device", [c for c in backend_cases() if c.values[1] == "cpu"
                                            and c.values[0] != "reference"])
def test_amp_steps_with_clipping_read_nothing(backend, device, cls, kw, host_reads):
    params = _params()
    opt = cls(params, backend=backend, max_grad_norm=0.5, lr_norm_power=0.5, **kw)
    _amp_steps(opt, params, torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    assert opt.backend == backend and opt.state
    assert host_reads == []


@pytest.mark.parametrize("cls,kw", CASES, ids=["sgd", "adamw"])
def test_amp_steps_on_the_cuda_host_twin_read_nothing(cls, kw, request, host_reads):
    import fused_lr.backends.cuda as cb

    request.getfixturevalue("on_twin")()
    params = _params()
    opt = cls(params, backend="reference", max_grad_norm=0.5, **kw)
    opt._backend = cb.CudaBackend()  # kept by the core: its devices (the twin's) take the parameters'
    _amp_steps(opt, params, torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    assert opt.backend == "cuda"
    assert host_reads == []


def test_error_if_nonfinite_is_the_one_reader(host_reads):
    params = _params()
    opt = FusedSGD(params, lr=0.1, max_grad_norm=0.5, error_if_nonfinite=True, backend="numba")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert host_reads and all("_fused_step" in r for r in host_reads)
