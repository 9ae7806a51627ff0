"""Property tests: every backend against the reference on identical random inputs.

Hypothesis draws tensor sizes (1, odd, across the Numba chunk boundary), hyper-parameters,
clipping settings, a GradScaler scale (with skipped steps), the schedule and the group clock it
starts from; the test runs one to three steps on the backend under test and on the reference
and compares parameters, momentum buffers, step counts, group clocks and the global norm.

Tolerances, relative to each tensor's scale (max |value| before and after the steps):
float64 1e-12 (measured worst over 400 examples: 1.4e-15): per element both sides do the
same IEEE operations; only the global norm is summed in another order, and a kernel may fuse
a*b+c. float32 2e-4 (measured worst over 400 examples: 7.2e-5): the reference takes the
float32 norm from torch.linalg.vector_norm, which on CPU accumulates in float32 and is off by
~1.6e-5 relative on a 100k-element clipped gradient, while a kernel may accumulate in float64
(the Numba one does: ~1e-8). That moves the clip coefficient, hence every update of a clipped
step, by the same relative amount, and momentum carries it over up to three steps. A formula
slip (a missing factor, the schedule read at the wrong step, a wrong momentum start) moves
values by whole percent.
"""

import pytest
import torch
from cases import backend_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused_lr import FusedSGD, schedules

TOL = {torch.float64: 1e-12, torch.float32: 2e-4}
EXAMPLES = 25
SLOW_EXAMPLES = 5  # Triton under its CPU interpreter runs each program in Python

SCHEDULES = [
    schedules.Constant(),
    schedules.Step(3, 0.5),
    schedules.MultiStep([2, 5], 0.3),
    schedules.Exponential(0.9),
    schedules.Linear(0.2, 1.0, 7),
    schedules.Polynomial(12, 2.0, 0.05),
    schedules.Cosine(15, 0.1),
    schedules.CosineRestarts(4, 2, 0.05),
    schedules.CosineRestarts(5),
    schedules.Cyclic(3.0, 3, 5, mode="triangular2"),
    schedules.Cyclic(2.0, 4, mode="exp_range", gamma=0.97),
    schedules.OneCycle(30, pct_start=0.25),
    schedules.OneCycle(20, anneal="linear"),
    schedules.InverseTime(0.5, 3, 0.7),
    schedules.InverseSqrt(4),
    schedules.PowerLaw(0.1, 1.5, 20),
    schedules.Warmup(4, schedules.Cosine(20), start_factor=0.1),
    schedules.Join([(schedules.Constant(1.0), 3), (schedules.Exponential(0.8), 4), schedules.Linear(0.5, 0.1, 9)]),
]

sizes = st.one_of(st.just(1), st.integers(2, 97), st.integers(98, 3001), st.integers(65_000, 140_000))


@st.composite
def shapes(draw):
    n = draw(sizes)
    if n > 4 and n % 4 == 0 and draw(st.booleans()):
        return (4, n // 4)
    return (n,)


@st.composite
def step_cases(draw):
    momentum = draw(st.one_of(st.just(0.0), st.floats(0.1, 0.99)))
    dampening = draw(st.one_of(st.just(0.0), st.floats(0.01, 0.5))) if momentum else 0.0
    group = dict(
        lr=draw(st.floats(1e-3, 1.0)), momentum=momentum, dampening=dampening,
        nesterov=bool(momentum) and dampening == 0 and draw(st.booleans()),
        weight_decay=draw(st.one_of(st.just(0.0), st.floats(1e-5, 0.1))),
        decoupled_weight_decay=draw(st.booleans()), maximize=draw(st.booleans()),
        schedule=draw(st.sampled_from(SCHEDULES)),
    )
    n_steps = draw(st.integers(1, 3))
    scale = draw(st.one_of(st.none(), st.sampled_from([0.125, 1.0, 128.0, 65536.0])))
    return dict(
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        shapes=draw(st.lists(shapes(), min_size=1, max_size=4)),
        groups=[group, dict(group, lr=group["lr"] / 3, weight_decay=0.0)] if draw(st.booleans()) else [group],
        max_grad_norm=draw(st.one_of(st.none(), st.floats(0.01, 10.0))),
        clip_value=draw(st.one_of(st.none(), st.floats(0.01, 2.0))),
        grad_magnitude=draw(st.floats(1e-3, 1e2)),
        start_step=draw(st.integers(0, 25)),
        grad_scale=scale,
        # a GradScaler skips steps whose gradients overflowed; only meaningful with a scale
        skips=[scale is not None and draw(st.booleans()) and draw(st.booleans()) for _ in range(n_steps)],
        seed=draw(st.integers(0, 2**16)),
    )


def run(case, backend, device):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype).to(device)) for s in case["shapes"]]
    grads = [[(torch.randn(s, generator=gen, dtype=dtype) * case["grad_magnitude"]).to(device)
              for s in case["shapes"]] for _ in case["skips"]]
    initial = [p.detach().cpu().clone() for p in params]
    split = len(params) // 2 if len(case["groups"]) == 2 else len(params)
    groups = [dict(case["groups"][0], params=params[:split])]
    if split < len(params):
        groups.append(dict(case["groups"][1], params=params[split:]))
    opt = FusedSGD(groups, backend=backend, max_grad_norm=case["max_grad_norm"], clip_value=case["clip_value"])
    if case["start_step"]:
        # resuming a schedule mid-way, without momentum buffers yet (a buffer starts from the
        # gradient): the schedule position is each group's clock, set through a checkpoint
        sd = opt.state_dict()
        for g in sd["param_groups"]:
            g["schedule_step"] = torch.tensor(float(case["start_step"]))
        opt.load_state_dict(sd)
    norms = []
    for step_grads, skip in zip(grads, case["skips"], strict=True):
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        if case["grad_scale"] is not None:  # what torch.amp.GradScaler hands the optimizer
            opt.grad_scale = torch.tensor(case["grad_scale"], device=device)
            opt.found_inf = torch.tensor(1.0 if skip else 0.0, device=device)
        opt.step()
        norms.append(None if opt.last_grad_norm is None else float(opt.last_grad_norm))
    bufs = [opt.state[p].get("momentum_buffer") for p in params]
    steps = [float(opt.state[p]["step"]) for p in params]
    clocks = [float(g["schedule_step"]) for g in opt.state_dict()["param_groups"]]
    return (initial, [p.detach().cpu() for p in params], [None if b is None else b.cpu() for b in bufs], steps,
            clocks, norms)


def assert_close(got, expected, initial, tol):
    for a, b, b0 in zip(got, expected, initial, strict=True):
        scale = max(float(b.abs().max()), float(b0.abs().max()), 1e-30)
        assert float((a - b).abs().max()) <= tol * scale


@pytest.mark.parametrize("backend,device", backend_cases())
def test_steps_match_reference(backend, device):
    examples = SLOW_EXAMPLES if backend == "triton" and device == "cpu" else EXAMPLES

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=step_cases())
    def check(case):
        tol = TOL[case["dtype"]]
        initial, params, bufs, steps, clocks, norms = run(case, backend, device)
        _, ref_params, ref_bufs, ref_steps, ref_clocks, ref_norms = run(case, "reference", device)
        taken = sum(not s for s in case["skips"])
        assert steps == ref_steps == [taken] * len(steps)  # updates applied to each parameter
        assert clocks == ref_clocks == [case["start_step"] + taken] * len(clocks)  # schedule positions
        assert_close(params, ref_params, initial, tol)
        assert [b is None for b in bufs] == [b is None for b in ref_bufs]
        assert_close([b for b in bufs if b is not None], [b for b in ref_bufs if b is not None],
                     [b for b in ref_bufs if b is not None], tol)
        for n, r in zip(norms, ref_norms, strict=True):
            assert (n is None) == (r is None)
            if n is not None:
                assert n == pytest.approx(r, rel=tol, nan_ok=True)

    check()
