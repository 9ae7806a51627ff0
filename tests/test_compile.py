"""torch.compile: a compiled training step with FusedSGD, and no recompile as the lr moves.

The lr of a fused_lr schedule is evaluated on the device from the step counter, and
FusedSGD.step is excluded from tracing (a compiled step graph-breaks there and runs it
eagerly), so nothing in a compiled graph depends on the lr. Compiles are counted with a
counting backend around ``aot_eager``: it takes the real Dynamo + AOTAutograd path (forward and
backward graphs) without Inductor's C++ compile, which takes minutes on a 2-core machine.

Tolerance: aot_eager runs the same aten kernels as eager in float64; 1e-10 relative leaves
room for a decomposition that reorders a reduction (~1e-16 per op).
"""

import pytest
import torch
import torch._dynamo
from cases import backend_cases, batches, make_model, max_rel_diff
from torch._dynamo.testing import CompileCounterWithBackend

from fused_lr import FusedSGD, schedules

STEPS = 6


def train(backend, device, mode):
    """mode: "eager"; "step-outside" (model compiled, opt.step() eager); "step-inside" (the
    whole step, zero_grad + forward + backward + opt.step(), compiled as one function)."""
    model = make_model(torch.float64, device)
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, max_grad_norm=0.05, backend=backend,
                   schedule=schedules.Warmup(2, schedules.Cosine(STEPS), start_factor=0.2))
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    net = torch.compile(model, backend=counter) if mode == "step-outside" else model

    def train_step(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss

    step_fn = torch.compile(train_step, backend=counter) if mode == "step-inside" else train_step
    lrs, compiles = [], []
    for x, y in batches(STEPS, torch.float64, device):
        lrs.append(opt.current_lr()[0])
        step_fn(x, y)
        compiles.append(counter.frame_count)
    return model, opt, lrs, compiles


@pytest.mark.parametrize("mode", ["step-outside", "step-inside"])
@pytest.mark.parametrize("backend,device", backend_cases())
def test_compiled_training_step(backend, device, mode):
    expected, _, expected_lrs, _ = train(backend, device, "eager")
    got, opt, lrs, compiles = train(backend, device, mode)
    assert opt.backend == backend
    assert lrs == expected_lrs
    assert len(set(lrs)) == STEPS  # the lr moved on every step...
    assert compiles == [1] * STEPS  # ...and one graph served them all
    assert max_rel_diff(expected, got) <= 1e-10
