"""The fault matrix: everything torch lets a user change between steps is seen by the next step
(docs/step.md, "Memory safety"). Each case applies the same change to a fused optimizer and to its
torch.optim counterpart (+ ``clip_grad_norm_``) and checks that the fused step either gives torch's
numbers or raises a one-line error naming the parameter while changing nothing (parameters, state,
clocks), after which the optimizer still works. Every case runs on every CPU backend and on the CUDA backend's
host twin (its host side over the kernels compiled for the CPU, tests/test_cuda_host.py), and with both
implementations of the per-step check (the compiled helper and its pure-Python twin,
fused_lr/core/meta.py).

Cases that crashed the process before the checks existed (a parameter resized under a cached
extent, a checkpoint whose state is smaller than the parameters, a gradient shortened or retyped
at the same address) also run in a child process per backend, so a crash fails the test instead
of ending the run.

Tolerance: float64 parameters throughout, 1e-10 relative to torch: the same IEEE operations per
element, the global norm summed in another order (docs/step.md, "Numerics and tolerances").
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import backend_cases
from test_cuda_host import generated, on_twin, twin_lib  # noqa: F401 (fixtures of the CUDA host twin)

from fused_lr import FusedAdamW, FusedSGD
from fused_lr.core import meta

RTOL = 1e-10
TWIN = "cuda-host-twin"
CLIP = 0.5
SHAPES = [(4, 3), (7,), (5,)]


class Run:
    """A fused optimizer and a torch one over twin copies of the same parameters."""

    def __init__(self, fused_cls, torch_cls, backend, clip=True, groups=None, **kw):
        gen = torch.Generator().manual_seed(0)
        base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        self.fp = [torch.nn.Parameter(t.clone()) for t in base]
        self.tp = [torch.nn.Parameter(t.clone()) for t in base]
        split = groups or (lambda ps: ps)
        self.clip = clip
        backend = "reference" if backend == TWIN else backend  # (the twin fixture routes it to CudaBackend)
        self.fused = fused_cls(split(self.fp), backend=backend, max_grad_norm=CLIP if clip else None, **kw)
        self.torch = torch_cls(split(self.tp), **kw)
        self.gen = torch.Generator().manual_seed(1)

    def grads(self):
        for fp, tp in zip(self.fp, self.tp, strict=True):
            g = torch.randn(fp.shape, generator=self.gen, dtype=fp.dtype)
            fp.grad, tp.grad = g.clone(), g.clone()

    def step_torch(self):
        if self.clip:
            torch.nn.utils.clip_grad_norm_([p for g in self.torch.param_groups for p in g["params"]], CLIP)
        self.torch.step()

    def steps(self, n=2):
        for _ in range(n):
            self.grads()
            self.fused.step()
            self.step_torch()

    def both(self, edit):
        """The same change on both sides: ``edit(opt, params)``."""
        edit(self.fused, self.fp)
        edit(self.torch, self.tp)

    def assert_equal(self):
        for a, b in zip(self._all(self.fused), self._all(self.torch), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            if a.numel():
                scale = b.detach().abs().max().clamp_min(1e-30)
                assert float((a.detach() - b.detach()).abs().max() / scale) <= RTOL

    @staticmethod
    def _all(opt):
        return [p for g in opt.param_groups for p in g["params"]]


def snapshot(opt) -> dict:
    """Everything a failed step or load must leave as it was."""
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else copy.copy(v)) for k, v in st.items()}
             for p, st in opt.state.items()}
    return dict(params=[(id(p), p.detach().clone()) for g in opt.param_groups for p in g["params"]],
                groups=[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                state=state, clocks=None if opt._clocks is None else opt._clocks.clone())


def assert_unchanged(opt, before: dict) -> None:
    after = snapshot(opt)
    assert [i for i, _ in after["params"]] == [i for i, _ in before["params"]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(after["params"], before["params"], strict=True))
    assert after["groups"] == before["groups"]
    assert after["state"].keys() == before["state"].keys()
    for key, st in after["state"].items():
        assert st.keys() == before["state"][key].keys()
        for k, v in st.items():
            w = before["state"][key][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w
    assert (after["clocks"] is None) == (before["clocks"] is None)
    assert after["clocks"] is None or torch.equal(after["clocks"], before["clocks"])


def assert_refused(run: Run, names: str, *, torch_raises: bool = True) -> None:
    """The fused step raises one line naming the parameter and changes nothing; torch's step fails
    too (when ``torch_raises``)."""
    before = snapshot(run.fused)
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        run.fused.step()
    message = str(info.value)
    assert names in message and "\n" not in message, message
    assert_unchanged(run.fused, before)
    if torch_raises:  # on a copy: torch's failed step leaves the tensors it reached changed
        twin = copy.copy(run)
        twin.torch = copy.deepcopy(run.torch)
        for a, b in zip(Run._all(twin.torch), Run._all(run.torch), strict=True):
            if b.grad is not None:
                a.grad = torch.zeros_like(a)
                a.grad.data = b.grad.data.clone()  # (as the user may have set it: .data skips the checks)
        with pytest.raises(RuntimeError):
            twin.step_torch()


# ------------------------------------------------------------------ the cases
# Each takes the backend and runs to completion or fails an assertion. CRASHERS also run in a child.

def case_param_resized_larger(backend):
    """b.data = torch.randn(20) on a 7-element parameter with momentum state (was: SIGSEGV)."""
    run = Run(FusedSGD, torch.optim.SGD, backend, lr=0.1, momentum=0.9)
    run.steps()
    run.both(lambda opt, ps: setattr(ps[1], "data", torch.ones(20, dtype=torch.float64)))
    run.grads()
    assert_refused(run, "param group 0, parameter 1")
    # the user's fix: drop the stale state; then both go on equal
    run.both(lambda opt, ps: opt.state.pop(ps[1]))
    run.steps()
    run.assert_equal()


def case_param_shrunk_at_the_same_address(backend):
    """p.data = p.data[:3]: same address, fewer elements. Without state the step takes torch's
    numbers over the 3 elements (was: the norm over the old 7, 4.6 % off); with momentum state both
    refuse."""
    run = Run(FusedSGD, torch.optim.SGD, backend, lr=0.1)
    run.steps()
    run.both(lambda opt, ps: setattr(ps[1], "data", ps[1].data[:3]))
    run.steps()
    run.assert_equal()
    run = Run(FusedAdamW, torch.optim.AdamW, backend, lr=0.1)
    run.steps()
    run.both(lambda opt, ps: setattr(ps[1], "data", ps[1].data[:3]))
    run.grads()
    assert_refused(run, "param group 0, parameter 1")


def case_param_reshaped_and_transposed(backend):
    """p.data replaced by a transposed view (same elements, other strides) and by a reshape with
    state reset: the state follows the parameter's logical elements."""
    run = Run(FusedSGD, torch.optim.SGD, backend, lr=0.1, momentum=0.9, weight_decay=1e-2)
    run.steps()
    run.both(lambda opt, ps: setattr(ps[0], "data", ps[0].data.t().contiguous().t()))  # same shape, column-major
    run.steps()
    run.assert_equal()
    run.both(lambda opt, ps: (setattr(ps[0], "data", ps[0].data.reshape(3, 4)), opt.state.pop(ps[0])))
    run.steps()
    run.assert_equal()


def case_param_retyped(backend):
    """p.data replaced by a float32 copy: the float64 momentum is cast to float32 as torch's
    load_state_dict would cast it (torch keeps it float64): float32 tolerance for that one."""
    run = Run(FusedSGD, torch.optim.SGD, backend, lr=0.1, momentum=0.9)
    run.steps()
    run.both(lambda opt, ps: setattr(ps[2], "data", ps[2].data.float()))
    run.steps()
    assert run.fp[2].dtype == torch.float32 and run.fused.state[run.fp[2]]["momentum_buffer"].dtype == torch.float32
    diff = (run.fp[2].detach().double() - run.tp[2].detach().double()).abs().max() / run.tp[2].detach().abs().max()
    assert float(diff) <= 1e-6  # a few float32 ulps over two steps
    for i in (0, 1):  # torch rounds the float32 tensor's norm to float32 before the global norm; we do not
        assert torch.allclose(run.fp[i], run.tp[i], rtol=1e-7, atol=0)


def case_grad_transposed_or_expanded(backend):
    """W.grad = buf.t() over the very memory the last gradient used, and a stride-0 expanded view
    of it: the same address, another layout. torch's numbers (was: read with the old layout, 0.55
    off)."""
    run = Run(FusedSGD, torch.optim.SGD, backend, lr=0.1, momentum=0.9)
    run.steps()
    mem0, mem1, mem2 = (p.grad for p in run.fp)  # contiguous, just used by a step
    for _ in range(2):
        new0 = torch.randn(3, 4, generator=run.gen, dtype=torch.float64)
        new1 = torch.randn(7, generator=run.gen, dtype=torch.float64)
        new2 = torch.randn(1, generator=run.gen, dtype=torch.float64)
        mem0.view(3, 4).copy_(new0)
        mem2[:1].copy_(new2)
        run.fp[0].grad, run.tp[0].grad = mem0.view(3, 4).t(), new0.t().clone()
        run.fp[1].grad, run.tp[1].grad = mem1.copy_(new1), new1.clone()
        # (torch's clip_grad_norm_ cannot write into a stride-0 view: its side gets a copy)
        run.fp[2].grad, run.tp[2].grad = mem2[:1].expand(5), new2.expand(5).clone()
        assert run.fp[0].grad.data_ptr() == mem0.data_ptr() and run.fp[2].grad.data_ptr() == mem2.data_ptr()
        run.fused.step()
        run.step_torch()
    run.assert_equal()


def case_grad_data_shortened(backend):
    """p.grad.data = p.grad.data[:3] (same address, fewer elements): refused, nothing changes."""
    run = Run(FusedSGD, torch.optim.SGD, backend, lr=0.1, momentum=0.9)
    run.steps()
    run.grads()
    for ps in (run.fp, run.tp):
        ps[1].grad.data = ps[1].grad.data[:3]
    assert_refused(run, "param group 0, parameter 1")


def case_grad_data_retyped(backend):
    """p.grad.data replaced by another dtype at the same address (float64 bits read as int64) and
    by a float32 copy: refused naming the parameter (was: garbage, 1e284)."""
    for make in (lambda g: g.view(torch.int64), lambda g: g.float()):
        run = Run(FusedSGD, torch.optim.SGD, backend, lr=0.1, momentum=0.9)
        run.steps()
        run.grads()
        run.fp[2].grad.data = make(run.fp[2].grad.data)
        assert_refused(run, "param group 0, parameter 2", torch_raises=False)


def case_param_list_edited(backend):
    """opt.param_groups[0]["params"][1] = c, an appended parameter, and a parameter moved to
    another group: torch trains what the lists hold now."""
    run = Run(FusedSGD, torch.optim.SGD, backend, lr=0.1, momentum=0.9,
              groups=lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}])
    run.steps()
    c = torch.randn(6, dtype=torch.float64)
    run.fp.append(torch.nn.Parameter(c.clone()))
    run.tp.append(torch.nn.Parameter(c.clone()))
    run.both(lambda opt, ps: opt.param_groups[0]["params"].__setitem__(1, ps[3]))
    run.steps()
    run.assert_equal()
    d = torch.randn(2, dtype=torch.float64)
    run.fp.append(torch.nn.Parameter(d.clone()))
    run.tp.append(torch.nn.Parameter(d.clone()))
    run.both(lambda opt, ps: opt.param_groups[1]["params"].append(ps[4]))
    run.steps()
    run.assert_equal()
    run.both(lambda opt, ps: opt.param_groups[1]["params"].append(opt.param_groups[0]["params"].pop(0)))
    run.steps()
    run.assert_equal()


def case_param_list_bad_edits(backend):
    """A non-tensor, an integer tensor or a duplicate put into a param list: refused naming it."""
    for bad, what in ((lambda ps: 3.0, "is a float"), (lambda ps: torch.zeros(3, dtype=torch.int64), "int64"),
                      (lambda ps: ps[0], "listed twice")):
        run = Run(FusedSGD, torch.optim.SGD, backend, lr=0.1, momentum=0.9)
        run.steps()
        run.grads()
        before = snapshot(run.fused)
        run.fused.param_groups[0]["params"].append(bad(run.fp))
        with pytest.raises((TypeError, ValueError)) as info:
            run.fused.step()
        assert "param group 0, parameter 3" in str(info.value) and what in str(info.value), str(info.value)
        run.fused.param_groups[0]["params"].pop()
        assert_unchanged(run.fused, before)
        run.fused.step()  # usable once the list is right again
        run.step_torch()
        run.assert_equal()


def case_state_cleared_deleted_replaced(backend):
    """opt.state.clear(), del opt.state[p], a state entry replaced: torch's numbers, and a checkpoint
    taken afterwards carries the new state (was: the kernels kept updating the old buffers)."""
    for cls, tcls, kw in ((FusedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                          (FusedAdamW, torch.optim.AdamW, dict(lr=0.05))):
        run = Run(cls, tcls, backend, **kw)
        run.steps()
        run.both(lambda opt, ps: opt.state.clear())
        run.steps()
        run.assert_equal()
        run.both(lambda opt, ps: opt.state.__delitem__(ps[0]))
        run.steps()
        run.assert_equal()
        name = "momentum_buffer" if cls is FusedSGD else "exp_avg"
        run.both(lambda opt, ps, name=name: opt.state[ps[1]].__setitem__(name, torch.full_like(ps[1], 0.25)))
        run.steps()
        run.assert_equal()
        sd, tsd = run.fused.state_dict(), run.torch.state_dict()
        for i in range(3):
            assert torch.allclose(sd["state"][i][name], tsd["state"][i][name], rtol=RTOL, atol=1e-300)


def case_state_tensor_data_replaced(backend):
    """opt.state[p][name].data = a tensor of the wrong size: refused naming the parameter."""
    run = Run(FusedSGD, torch.optim.SGD, backend, lr=0.1, momentum=0.9)
    run.steps()
    run.both(lambda opt, ps: setattr(opt.state[ps[1]]["momentum_buffer"], "data", torch.zeros(3, dtype=torch.float64)))
    run.grads()
    assert_refused(run, "param group 0, parameter 1")


def case_narrower_checkpoint(backend):
    """A checkpoint whose state is smaller than the parameters (a narrower model's): load raises,
    the optimizer is exactly as it was and goes on stepping (was: double free or corruption)."""
    narrow = [torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(3)),
              torch.nn.Parameter(torch.randn(2, dtype=torch.float64))]
    donor = FusedSGD(narrow, lr=0.1, momentum=0.9, backend="reference")
    for p in narrow:
        p.grad = torch.ones_like(p)
    donor.step()
    run = Run(FusedSGD, torch.optim.SGD, backend, lr=0.1, momentum=0.9)
    run.steps()
    before = snapshot(run.fused)
    with pytest.raises(ValueError, match="param group 0, parameter 0: its 'momentum_buffer' state"):
        run.fused.load_state_dict(donor.state_dict())
    assert_unchanged(run.fused, before)
    run.steps()
    run.assert_equal()


def case_bad_checkpoints_change_nothing(backend):
    """A 2-element or string step, a string schedule_step, a list-valued state entry: load raises
    one line, nothing changes, state_dict() and step() work afterwards."""
    run = Run(FusedAdamW, torch.optim.AdamW, backend, lr=0.05)
    run.steps()
    good = run.fused.state_dict()

    def spoil(edit):
        sd = copy.deepcopy(good)
        edit(sd)
        return sd

    bad = [spoil(lambda sd: sd["state"][0].__setitem__("step", torch.tensor([1.0, 2.0]))),
           spoil(lambda sd: sd["state"][1].__setitem__("step", "2")),
           spoil(lambda sd: sd["param_groups"][0].__setitem__("schedule_step", "x")),
           spoil(lambda sd: sd["state"][2].__setitem__("exp_avg", [0.0] * 5)),
           spoil(lambda sd: sd["param_groups"][0].__setitem__("betas", (0.9, 1.5)))]
    for sd in bad:
        before = snapshot(run.fused)
        with pytest.raises((ValueError, TypeError)) as info:
            run.fused.load_state_dict(sd)
        assert "load_state_dict: param group 0" in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert_unchanged(run.fused, before)
        run.fused.state_dict()
    run.steps()
    run.assert_equal()


def case_zero_element_parameters_stay_on_the_kernels(backend):
    """A (3, 0) and a (0,) parameter beside normal ones: the chosen backend runs the step (was: every
    parameter sent to the reference), with torch's numbers."""
    import warnings

    run = Run(FusedAdamW, torch.optim.AdamW, backend, lr=0.05)
    for shape in ((3, 0), (0,)):
        run.fp.append(torch.nn.Parameter(torch.empty(shape, dtype=torch.float64)))
        run.tp.append(torch.nn.Parameter(torch.empty(shape, dtype=torch.float64)))
        run.both(lambda opt, ps: opt.param_groups[0]["params"].append(ps[-1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.steps()
    assert run.fused.backend == ("cuda" if backend == TWIN else backend)
    run.assert_equal()


def case_param_groups_replaced(backend):
    """opt.param_groups replaced by a new list of new group dicts (the same parameter lists, a new lr):
    the next step reads the new groups (was: the settings kept the old list, which the reference read)."""
    run = Run(FusedSGD, torch.optim.SGD, backend, lr=0.1, momentum=0.9)
    run.steps()
    run.both(lambda opt, ps: setattr(opt, "param_groups", [{**g, "lr": g["lr"] / 2} for g in opt.param_groups]))
    run.steps()
    run.assert_equal()


def case_clip_value_switched_on_with_complex_parameters(backend):
    """clip_value set after some steps of a model with a complex parameter: refused at the step, as
    torch's clip_grad_value_ refuses complex gradients, and nothing changes."""
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(0)))
    opt = FusedSGD([p], lr=0.1, momentum=0.9, backend="reference" if backend == TWIN else backend)
    p.grad = torch.ones_like(p)
    opt.step()
    opt.clip_value = 0.5
    p.grad = torch.ones_like(p)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="clip_value does not apply to complex parameters"):
        opt.step()
    assert_unchanged(opt, before)
    twin = p.detach().clone().requires_grad_()
    twin.grad = p.grad.clone()
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_value_([twin], 0.5)


CASES = {name[5:]: f for name, f in sorted(globals().items()) if name.startswith("case_")}
CRASHERS = ["param_resized_larger", "narrower_checkpoint", "grad_data_shortened", "grad_data_retyped"]
CPU = [c for c in backend_cases() if c.values[1] == "cpu"]


@pytest.fixture(params=["compiled", "python"])
def meta_impl(request, monkeypatch):
    """Each case with the compiled check and with its pure-Python twin (identical behaviour)."""
    if request.param == "compiled":
        if meta.IMPL != "compiled":
            pytest.skip("the compiled helper fused_lr._meta is not built here")
    else:
        monkeypatch.setattr(meta, "structure", meta.structure_py)
        monkeypatch.setattr(meta, "grads", meta.grads_py)
    return request.param


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend,device", CPU)
def test_fault(case, backend, device, meta_impl):
    CASES[case](backend)


@pytest.fixture
def cuda_twin(request, monkeypatch):
    """The CUDA backend's host side over its host-compiled kernels (tests/test_cuda_host.py), in
    place of the reference the optimizer is built with."""
    import fused_lr.backends as registry
    import fused_lr.backends.cuda as cb

    request.getfixturevalue("on_twin")()
    create = registry.create
    monkeypatch.setattr(registry, "create", lambda name, device: cb.CudaBackend() if name == "reference"
                        else create(name, device))


@pytest.mark.parametrize("case", sorted(CASES))
def test_fault_on_the_cuda_host_twin(case, cuda_twin, meta_impl):
    CASES[case](TWIN)


def _child(backend: str) -> None:
    """Runs every crash-prone case, printing a line as each starts and ends."""
    for name in CRASHERS:
        print(json.dumps(["start", name]), flush=True)
        CASES[name](backend)
        print(json.dumps(["pass", name]), flush=True)


# the check in use here in the default run, the other one with the slow tests (a child costs ~8 s)
IMPLS = [pytest.param(impl, marks=[] if impl == meta.IMPL else [pytest.mark.slow]) for impl in ("compiled", "python")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend,device", CPU)
def test_crash_prone_cases_in_a_child_process(backend, device, impl):
    if impl == "compiled" and meta.IMPL != "compiled":
        pytest.skip(f"the compiled helper is not in use here: {meta.WHY_PYTHON}")
    env = {**os.environ, "FUSED_LR_META": "python" if impl == "python" else ""}
    here = Path(__file__).parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_stale_plan as t; t._child({backend!r})"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("[")]
    passed = [n for e, n in events if e == "pass"]
    assert done.returncode == 0 and passed == CRASHERS, (
        f"exit {done.returncode} after {events[-1:] or 'nothing'}: {done.stderr[-2000:]}")
