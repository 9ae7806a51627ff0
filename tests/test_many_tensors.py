"""Many tensors of odd sizes against the reference backend, on every backend.

Kernels cut the parameters into chunks and pack many tensors into one launch; these sizes put
tensors below a vector width, across chunk boundaries (65537 = 2**16 + 1, 4097 = 2**12 + 1) and
hundreds into one launch. Every feature is switched on (two groups, momentum with nesterov and
dampening, both weight decays, maximize, value and norm clipping, AMP unscaling, schedules) so
each code path meets every size.

Tolerances. Backends run the reference's operations element by element; what differs is the
order of the norm's reduction (the clip coefficient moves by an ulp) and fused multiply-adds.
After three steps that is a few ulps of the parameters: float64 rtol 1e-12 (ulp 2.2e-16),
float32 rtol 1e-5 (ulp 1.2e-7); atol covers elements that pass near zero. The norm is one
reduction: float64 2e-13 relative; float32 1e-4, because torch's own CPU vector_norm (the
reference) is off by up to ~n ulp on these sizes: float32 measured 2.9e-5 relative against float64
on 65537 clipped values, where a pairwise sum is within 1e-7; float64 8.6e-14 against an exact
math.fsum on the same values, where the Numba kernel is within 2.4e-14.
"""

import pytest
import torch
from cases import backend_cases

from fused_lr import FusedSGD, schedules

SIZES = {
    "1": [(1,)],
    "3": [(3,)],
    "1000": [(10, 100)],
    "65537": [(65537,)],
    "mix": [(1,), (3,), (1000,), (65537,), (2, 3, 5), (4097,), (16,), (17,), (4, 4, 3, 3), (130,)],
    "300-small": [(int(n),) for n in torch.randint(1, 300, (300,), generator=torch.Generator().manual_seed(3))],
}
STEPS = 3
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=1e-6)}
NORM_RTOL = {torch.float64: 2e-13, torch.float32: 1e-4}
AMP_SCALE = 1024.0


def run(backend, device, dtype, shapes):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=gen, dtype=dtype).to(device).requires_grad_() for shape in shapes]
    groups = [dict(params=params[0::2])]
    if len(params) > 1:
        groups.append(dict(params=params[1::2], lr=0.03, momentum=0.8, dampening=0.2, nesterov=False, weight_decay=1e-2,
                           decoupled_weight_decay=True, maximize=True, schedule=schedules.Step(2, 0.5)))
    opt = FusedSGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, max_grad_norm=1.0,
                   clip_value=0.05, schedule=schedules.Warmup(2, schedules.Cosine(10), start_factor=0.1),
                   backend=backend)
    norms = []
    for _ in range(STEPS):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen, dtype=dtype) * 0.1 * AMP_SCALE).to(device)
        # what torch.amp.GradScaler hands an optimizer that unscales itself
        opt.grad_scale = torch.tensor(AMP_SCALE, device=device)
        opt.found_inf = torch.zeros((), device=device)
        opt.step()
        del opt.grad_scale, opt.found_inf
        norms.append(opt.last_grad_norm.clone())
    return params, opt, norms


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("sizes", list(SIZES))
@pytest.mark.parametrize("backend,device", backend_cases())
def test_many_tensors_match_reference(backend, device, sizes, dtype):
    shapes = SIZES[sizes]
    expected, ref_opt, ref_norms = run("reference", device, dtype, shapes)
    got, opt, norms = run(backend, device, dtype, shapes)
    assert opt.backend == backend
    for e, g in zip(ref_norms, norms, strict=True):
        torch.testing.assert_close(g, e, rtol=NORM_RTOL[dtype], atol=0)
    for pe, pg in zip(expected, got, strict=True):
        torch.testing.assert_close(pg, pe, **TOL[dtype])
        torch.testing.assert_close(opt.state[pg]["momentum_buffer"], ref_opt.state[pe]["momentum_buffer"], **TOL[dtype])
        assert float(opt.state[pg]["step"]) == STEPS
