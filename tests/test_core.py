"""The optimizer core (fused_lr/core): planned once, hyper-parameters picked up per step, tensor
lr, copies and pickles, checkpoint round trips, and the per-group schedule clock.

Tolerances: float64 1e-12 relative where two runs do the same IEEE operations (torch's SGD and
our reference, or one backend against itself); float64 1e-10 against torch where the norm is
summed in another order (docs/step.md, "Numerics")."""

import copy
import pickle
from pathlib import Path

import pytest
import torch
from cases import backend_cases, batches, make_model, max_rel_diff
from torch.optim import lr_scheduler as lrs

from fused_lr import FusedSGD, schedules


def _train(model, opt, n, *, set_to_none=True, seed=1, before_step=None):
    for i, (x, y) in enumerate(batches(n, next(model.parameters()).dtype, next(model.parameters()).device, seed)):
        opt.zero_grad(set_to_none=set_to_none)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if before_step is not None:
            before_step(i)
        opt.step()


@pytest.mark.parametrize("backend,device", backend_cases())
def test_set_to_none_steps_build_nothing_after_the_first(backend, device):
    """100 steps whose gradients are new tensors every step: one plan, one set of backend tables;
    only the gradient addresses are rewritten."""
    model = make_model(torch.float64, device)
    opt = FusedSGD(model.parameters(), lr=0.05, momentum=0.9, max_grad_norm=1.0, backend=backend,
                   schedule=schedules.Cosine(100))
    _train(model, opt, 1)
    plans = list(opt._plans.values())
    backend_obj = opt._backend
    rebuilds = getattr(backend_obj, "rebuilds", 0)
    versions = plans[0].grad_version
    _train(model, opt, 100)
    assert list(opt._plans.values()) == plans and opt._plans[None] is plans[0]
    assert opt._backend is backend_obj and getattr(backend_obj, "rebuilds", 0) == rebuilds
    assert plans[0].grad_version > versions  # the addresses did move and were refreshed


@pytest.mark.parametrize("backend,device", backend_cases())
def test_lr_changed_by_hand_or_scheduler_is_picked_up_without_a_rebuild(backend, device):
    model, twin = make_model(torch.float64, device), make_model(torch.float64, device)
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, backend=backend)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    sched = lrs.StepLR(ref, 3, 0.5)
    for i, (x, y) in enumerate(batches(9, torch.float64, device)):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        sched.step()
        opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"]  # by hand
        if i == 0:
            plan = opt._plans[None]
    assert opt._plans[None] is plan
    assert max_rel_diff(model, twin) <= 1e-12


@pytest.mark.parametrize("backend,device", backend_cases())
def test_invalid_hyper_parameter_set_mid_run_raises_before_anything_changes(backend, device):
    model = make_model(torch.float64, device)
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, backend=backend, schedule=schedules.Step(2, 0.5))
    _train(model, opt, 2)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    for key, bad in (("momentum", 1.5), ("lr", float("nan")), ("weight_decay", -1.0), ("nesterov", "yes")):
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = bad
        with pytest.raises((ValueError, TypeError), match=key):
            opt.step()
        opt.param_groups[0][key] = good
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    after = opt.state_dict()
    assert all(torch.equal(after["state"][i][k], v) for i, st in state["state"].items() for k, v in st.items())
    assert float(after["param_groups"][0]["schedule_step"]) == float(state["param_groups"][0]["schedule_step"])


@pytest.mark.parametrize("backend,device", backend_cases())
def test_tensor_lr_equals_float_lr_and_can_change_mid_run(backend, device):
    a, b = make_model(torch.float64, device), make_model(torch.float64, device)
    lr = torch.tensor(0.1, dtype=torch.float64, device=device)
    opt_a = FusedSGD(a.parameters(), lr=lr, momentum=0.9, backend=backend, schedule=schedules.Cosine(8))
    opt_b = FusedSGD(b.parameters(), lr=0.1, momentum=0.9, backend=backend, schedule=schedules.Cosine(8))

    def change(opt, i):
        if i == 3:  # a's lr tensor in place (read on the device every step), b's float by hand
            if opt is opt_a:
                lr.fill_(0.05)
            else:
                opt.param_groups[0]["lr"] = 0.05
        if i == 5:  # a new tensor for a
            opt.param_groups[0]["lr"] = torch.tensor(0.02, dtype=torch.float64, device=device) if opt is opt_a else 0.02

    _train(a, opt_a, 8, before_step=lambda i: change(opt_a, i))
    _train(b, opt_b, 8, before_step=lambda i: change(opt_b, i))
    assert max_rel_diff(a, b) <= 1e-12


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_configuration_survives_copies(how):
    model = make_model()
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, max_grad_norm=0.5, clip_value=2.0,
                   error_if_nonfinite=True, backend="reference", schedule=schedules.Step(2, 0.5))
    _train(model, opt, 3)
    copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    for attr in ("max_grad_norm", "clip_value", "error_if_nonfinite", "backend_name", "process_group"):
        assert getattr(copied, attr) == getattr(opt, attr), attr
    assert copied.current_lr() == opt.current_lr()
    # the copy steps its own parameters exactly as the original steps its own
    params = [p for g in copied.param_groups for p in g["params"]]
    for p, q in zip(params, model.parameters(), strict=True):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    copied.step()
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters(), strict=True))


def test_state_dict_pre_hook_with_a_non_tensor_entry():
    """torch's own optimizer tests add state["test"] = 1 in a state_dict pre-hook."""
    model = make_model()
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 1)
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))
    assert opt.state_dict()["state"]["test"] == 1


def test_load_state_dict_round_trip_is_unchanged():
    model = make_model()
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, schedule=schedules.Cosine(10))
    _train(model, opt, 2)
    sd = opt.state_dict()
    other = FusedSGD(make_model().parameters(), lr=0.3, momentum=0.5, schedule=schedules.Cosine(10))
    other.load_state_dict(sd)
    again = other.state_dict()
    strip = lambda g: {k: v for k, v in g.items() if k != "schedule_step"}  # noqa: E731
    assert [strip(g) for g in again["param_groups"]] == [strip(g) for g in sd["param_groups"]]
    assert [float(g["schedule_step"]) for g in again["param_groups"]] == [2.0]
    assert again["state"].keys() == sd["state"].keys()


@pytest.mark.parametrize("backend,device", backend_cases())
def test_schedule_clock_is_the_groups(backend, device):
    """A layer without gradients for a few steps keeps to its group's schedule, as torch's
    schedulers do: FusedSGD with Step(2, 0.5) equals SGD + StepLR through a freeze/unfreeze."""
    model, twin = make_model(torch.float64, device), make_model(torch.float64, device)
    opt = FusedSGD(model.parameters(), lr=0.1, backend=backend, schedule=schedules.Step(2, 0.5))
    ref = torch.optim.SGD(twin.parameters(), lr=0.1)
    sched = lrs.StepLR(ref, 2, 0.5)
    for i, (x, y) in enumerate(batches(10, torch.float64, device)):
        frozen = 2 <= i < 6
        for m, o in ((model, opt), (twin, ref)):
            m.fc.requires_grad_(not frozen)
            o.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        sched.step()
    assert opt.current_lr() == pytest.approx(sched.get_last_lr(), rel=1e-15)
    assert max_rel_diff(model, twin) <= 1e-12


def _huge_page_eligible(address: int) -> bool | None:
    """Whether the mapping holding ``address`` may get transparent huge pages (smaps' THPeligible;
    None where this system does not say)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "THPeligible:":
            return line.split()[1] == "1"
    return None


def test_new_state_lies_back_to_back_in_one_mapping_each_tensor_its_own_storage():
    """State a step creates (fused_lr/core/arena.py) lies back to back in one mapping that asked for
    huge pages, each tensor of its parameter's dtype, shape and strides (channels_last included),
    on its own cache line, starting at the rule's initial value, and with a storage of its own: a
    pickle of one state tensor holds its bytes, not the block's; a checkpoint holds the state once,
    and a step after loading it continues exactly."""
    from fused_lr import FusedAdagrad

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(600, 1000)), torch.nn.Parameter(torch.randn(3)),
              torch.nn.Parameter(torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last)),
              torch.nn.Parameter(torch.randn(7, dtype=torch.float64))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = FusedAdagrad(params, lr=0.1, initial_accumulator_value=0.25, backend="reference")
    opt.step()
    sums = [opt.state[p]["sum"] for p in params]
    for p, s in zip(params, sums, strict=True):
        assert (s.dtype, s.shape, s.stride()) == (p.dtype, p.shape, p.stride())
        assert s.data_ptr() % 64 == 0 and s.untyped_storage().nbytes() == s.numel() * s.element_size()
        torch.testing.assert_close(s, torch.full_like(p, 0.25).addcmul_(p.grad, p.grad), rtol=0, atol=0)
    starts = [s.data_ptr() for s in sums]
    gaps = [b - a - s.untyped_storage().nbytes() for a, b, s in zip(starts, starts[1:], sums, strict=False)]
    assert all(0 <= gap < 64 for gap in gaps)  # back to back, each on a cache line
    assert len(pickle.dumps(sums[1])) < 4096  # 3 elements, not the 2.4 MB block
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[never]" not in thp.read_text():
        assert _huge_page_eligible(sums[0].data_ptr()) is not False  # the 2.4 MB mapping asked for huge pages

    import io

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    state_bytes = sum(s.numel() * s.element_size() for s in sums)
    assert buf.tell() < state_bytes + 16384  # each tensor's bytes once
    buf.seek(0)
    twins = [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format)) for p in params]
    other = FusedAdagrad(twins, lr=0.1, initial_accumulator_value=0.25, backend="reference")
    other.load_state_dict(torch.load(buf, weights_only=True))
    for p, q in zip(params, twins, strict=True):
        q.grad = p.grad.clone()
    opt.step()
    other.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins, strict=True))
