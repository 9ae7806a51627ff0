"""GPU-only: a FusedSGD step is one device-side unit: no host synchronisation, and it can be
captured in a CUDA graph whose replays advance the schedule on the device.

Runs for every registered backend that runs on CUDA tensors here, except the reference, which
reads step counts and found_inf on the host by design. Skipped, with the reason, where there is
no CUDA device or the backend cannot run on one.
"""

import pytest
import torch
from cases import make_model, split_groups

from fused_lr import FusedSGD, available_backends, schedules
from fused_lr.backends import devices

WARMUP = 3  # eager steps before capture: the first allocates state, the second settles the tables
REPLAYS = 100


def cuda_cases():
    cases = []
    for name, status in available_backends().items():
        if name == "reference":
            continue
        reason = None
        if not torch.cuda.is_available():
            reason = "no CUDA device here"
        elif status is not True:
            reason = f"{name}: {status}"
        elif "cuda" not in devices(name):
            reason = f"{name} runs on {sorted(devices(name))} tensors here, not cuda"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        cases.append(pytest.param(name, id=name, marks=marks))
    return cases


def make_opt(model, backend):
    decay, no_decay = split_groups(model)
    return FusedSGD([dict(params=decay),
                     dict(params=no_decay, lr=0.05, weight_decay=0.0, schedule=schedules.Exponential(0.99))],
                    lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, max_grad_norm=0.05, backend=backend,
                    schedule=schedules.Warmup(10, schedules.Cosine(REPLAYS), start_factor=0.1))


def grads_for(model, step):
    """Deterministic gradients for a step, made on the CPU so both runs see the same numbers."""
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in model.parameters()]


def set_grads(model, grads):
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad.copy_(g)  # static gradient tensors: a graph replays reads of these addresses


def static_grads(model):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


def captured_step(model, opt, all_grads):
    """WARMUP eager steps on a side stream (as torch.cuda.graphs advises), then one step captured,
    not run: the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(WARMUP):
            set_grads(model, all_grads[step])
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


@pytest.mark.parametrize("backend", cuda_cases())
def test_cuda_graph_replay_equals_eager(backend):
    """Capture one whole step, replay it REPLAYS times with fresh gradients copied into the
    static gradient tensors: bit-for-bit the eager run, so the schedule (warm-up then cosine,
    and an exponential group) advanced on the device at every replay."""
    eager, graphed = make_model(torch.float32, "cuda"), make_model(torch.float32, "cuda")
    opt_e, opt_g = make_opt(eager, backend), make_opt(graphed, backend)
    static_grads(eager)
    static_grads(graphed)
    all_grads = [grads_for(eager, step) for step in range(WARMUP + REPLAYS)]

    graph = captured_step(graphed, opt_g, all_grads)
    for step in range(WARMUP, WARMUP + REPLAYS):
        set_grads(graphed, all_grads[step])
        graph.replay()

    for step in range(WARMUP + REPLAYS):
        set_grads(eager, all_grads[step])
        opt_e.step()
    torch.cuda.synchronize()

    assert {float(opt_g.state[p]["step"]) for p in graphed.parameters()} == {float(WARMUP + REPLAYS)}
    for pe, pg in zip(eager.parameters(), graphed.parameters(), strict=True):
        assert torch.equal(pe, pg)
        assert torch.equal(opt_e.state[pe]["momentum_buffer"], opt_g.state[pg]["momentum_buffer"])
    assert torch.equal(opt_e.last_grad_norm, opt_g.last_grad_norm)
    # the run is long enough for the schedule to matter: a frozen lr would have ended elsewhere
    assert opt_e.current_lr()[0] < 0.5 * 0.1


@pytest.mark.parametrize("backend", cuda_cases())
def test_a_replay_runs_with_the_settings_it_captured(backend):
    """docs/step.md, "What a replayed CUDA graph sees": an lr set after the capture moves the eager
    steps only (they upload fresh tables); the graph replays with the lr it captured, from the
    tables it captured, which stay alive, and with the clocks as the eager step left them."""
    graphed, eager = make_model(torch.float32, "cuda"), make_model(torch.float32, "cuda")
    opt_g, opt_e = make_opt(graphed, backend), make_opt(eager, backend)
    static_grads(graphed)
    static_grads(eager)
    all_grads = [grads_for(graphed, step) for step in range(WARMUP + 2)]
    graph = captured_step(graphed, opt_g, all_grads)  # with lr 0.1
    opt_g.param_groups[0]["lr"] = 0.01
    set_grads(graphed, all_grads[WARMUP])
    opt_g.step()  # eager, lr 0.01
    set_grads(graphed, all_grads[WARMUP + 1])
    graph.replay()  # lr 0.1, as captured

    for step in range(WARMUP + 2):
        opt_e.param_groups[0]["lr"] = 0.01 if step == WARMUP else 0.1
        set_grads(eager, all_grads[step])
        opt_e.step()
    torch.cuda.synchronize()
    assert {float(opt_g.state[p]["step"]) for p in graphed.parameters()} == {float(WARMUP + 2)}
    for pe, pg in zip(eager.parameters(), graphed.parameters(), strict=True):
        assert torch.equal(pe, pg)


@pytest.mark.parametrize("backend", cuda_cases())
def test_step_does_not_synchronise(backend):
    model = make_model(torch.float32, "cuda")
    opt = make_opt(model, backend)
    static_grads(model)
    for step in range(WARMUP):
        set_grads(model, grads_for(model, step))
        opt.step()
    set_grads(model, grads_for(model, WARMUP))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert {float(opt.state[p]["step"]) for p in model.parameters()} == {float(WARMUP + 1)}
