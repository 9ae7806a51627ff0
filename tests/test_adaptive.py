"""The adaptive family on the core: checkpoints that load both ways with torch's optimizers and
resume exactly, bad hyper-parameters that raise before anything changes, and the gradient-norm
rate. float64 throughout: 1e-12 relative where both sides do the same operations (the norm
summed in another order), bit for bit where one run resumes another on the same backend."""

import copy

import pytest
import torch
from cases import backend_cases, batches, make_model, max_rel_diff
from torch.optim import lr_scheduler as lrs

from fused_lr import FusedAdagrad, FusedAdam, FusedAdamW, FusedRMSprop, FusedSGD, available_backends, schedules
from fused_lr.backends import devices

FAMILY = {
    "adamw": (FusedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "adam": (FusedAdam, torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2, betas=(0.8, 0.95))),
    "rmsprop": (FusedRMSprop, torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2)),
    "adagrad": (FusedAdagrad, torch.optim.Adagrad, dict(lr=1e-2, lr_decay=1e-3, initial_accumulator_value=0.1)),
}


def _run(model, opt, batches_, sched=None):
    for x, y in batches_:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("backend,device", backend_cases())
def test_checkpoints_load_both_ways_mid_schedule(name, backend, device):
    """torch's optimizer + LambdaLR for 4 steps, its checkpoint into ours, 4 more steps; and ours
    into torch's: both equal one uninterrupted torch run."""
    ours_cls, torch_cls, kw = FAMILY[name]
    sched = schedules.Cosine(8)
    base = make_model(torch.float64, device)
    ref = copy.deepcopy(base)
    ref_opt = torch_cls(ref.parameters(), **kw)
    ref_sched = lrs.LambdaLR(ref_opt, sched)
    _run(ref, ref_opt, batches(8, torch.float64, device), ref_sched)
    for first, second in (("torch", "ours"), ("ours", "torch")):
        model = copy.deepcopy(base)
        make = {"torch": lambda m: torch_cls(m.parameters(), **kw),
                "ours": lambda m: ours_cls(m.parameters(), backend=backend, schedule=sched, **kw)}
        opt = make[first](model)
        lam = lrs.LambdaLR(opt, sched) if first == "torch" else None
        stream = batches(8, torch.float64, device)
        _run(model, opt, [next(stream) for _ in range(4)], lam)
        saved = copy.deepcopy(opt.state_dict())
        opt2 = make[second](model)
        if second == "ours":  # torch's checkpoint has step counts, but no schedule clock: it says so
            with pytest.warns(UserWarning, match="resumes at k=4"):
                opt2.load_state_dict(saved)
        else:
            opt2.load_state_dict(saved)
        lam2 = None
        if second == "torch":  # torch's side resumes its LambdaLR at step 4
            for g in opt2.param_groups:
                g["initial_lr"] = kw["lr"]
            lam2 = lrs.LambdaLR(opt2, sched, last_epoch=3)
        else:
            assert float(opt2.state_dict()["param_groups"][0]["schedule_step"]) == 4.0
        _run(model, opt2, list(stream), lam2)
        assert max_rel_diff(model, ref) <= 1e-12, (first, second)


@pytest.mark.parametrize("name", FAMILY)
def test_resumed_run_continues_bit_identically(name):
    ours_cls, _, kw = FAMILY[name]
    a = make_model()
    b = copy.deepcopy(a)
    opt_a = ours_cls(a.parameters(), schedule=schedules.Step(2, 0.5), max_grad_norm=0.5, **kw)
    _run(a, opt_a, batches(6))
    opt_b = ours_cls(b.parameters(), schedule=schedules.Step(2, 0.5), max_grad_norm=0.5, **kw)
    stream = batches(6)
    _run(b, opt_b, [next(stream) for _ in range(3)])
    saved = copy.deepcopy((b.state_dict(), opt_b.state_dict()))
    c = make_model(seed=7)
    c.load_state_dict(saved[0])
    opt_c = ours_cls(c.parameters(), schedule=schedules.Step(2, 0.5), max_grad_norm=0.5, **kw)
    opt_c.load_state_dict(saved[1])
    _run(c, opt_c, list(stream))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


BAD = [
    (FusedAdamW, dict(betas=(-0.1, 0.9)), "betas"), (FusedAdamW, dict(betas=(0.9, 1.0)), "betas"),
    (FusedAdam, dict(eps=0.0), "eps"), (FusedAdam, dict(amsgrad="no"), "amsgrad"),
    (FusedRMSprop, dict(alpha=1.5), "alpha"), (FusedRMSprop, dict(eps=-1e-8), "eps"),
    (FusedRMSprop, dict(momentum=-0.1), "momentum"), (FusedAdagrad, dict(lr_decay=-1.0), "lr_decay"),
    (FusedAdagrad, dict(initial_accumulator_value=-1.0), "initial_accumulator_value"),
    (FusedSGD, dict(lr_norm_power=-1.0), "lr_norm_power"), (FusedAdamW, dict(lr_norm_eps=0.0), "lr_norm_eps"),
]


@pytest.mark.parametrize("cls,kw,word", BAD, ids=[f"{c.__name__}-{w}" for c, _, w in BAD])
def test_bad_hyper_parameters_raise_at_construction(cls, kw, word):
    with pytest.raises((ValueError, TypeError), match=word):
        cls(make_model().parameters(), **kw)


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("backend,device", backend_cases())
def test_bad_value_set_mid_run_changes_nothing(name, backend, device):
    ours_cls, _, kw = FAMILY[name]
    model = make_model(torch.float64, device)
    opt = ours_cls(model.parameters(), backend=backend, **kw)
    _run(model, opt, batches(2, torch.float64, device))
    before = copy.deepcopy((dict(model.named_parameters()), opt.state_dict()))
    key = next(k for k in ("betas", "alpha", "lr_decay") if k in opt.param_groups[0])
    good = opt.param_groups[0][key]
    opt.param_groups[0][key] = (1.5, 0.9) if key == "betas" else -1.0
    with pytest.raises(ValueError, match=key):
        _run(model, opt, batches(1, torch.float64, device, seed=9))
    opt.param_groups[0][key] = good
    after = (dict(model.named_parameters()), opt.state_dict())  # BN's running stats move in the forward
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    for i, st in before[1]["state"].items():
        assert all(torch.equal(after[1]["state"][i][k], v) for k, v in st.items())


@pytest.mark.parametrize("name", ["sgd", *FAMILY])
@pytest.mark.parametrize("backend,device", backend_cases())
def test_gradient_norm_rate(name, backend, device):
    """lr x (N + eps) ** -gamma with N the global gradient norm before clipping, against torch's
    optimizer whose lr is set to exactly that each step (and clipped by clip_grad_norm_)."""
    ours_cls, torch_cls, kw = FAMILY.get(name, (FusedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)))
    gamma, eps, clip = 0.5, 1e-3, 0.3
    model, twin = make_model(torch.float64, device), make_model(torch.float64, device)
    opt = ours_cls(model.parameters(), backend=backend, lr_norm_power=gamma, lr_norm_eps=eps, max_grad_norm=clip,
                   schedule=schedules.Exponential(0.9), **kw)
    ref = torch_cls(twin.parameters(), **kw)
    for k, (x, y) in enumerate(batches(6, torch.float64, device)):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
        norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), clip)
        ref.param_groups[0]["lr"] = kw["lr"] * 0.9 ** k * (float(norm) + eps) ** -gamma
        opt.step()
        ref.step()
    assert max_rel_diff(model, twin) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", FAMILY)
def test_half_precision_is_float32_math_rounded_once(name, dtype):
    """16-bit parameters and state are computed in float32 and rounded once per stored value
    (docs/step.md): the triton kernels' step equals the float32 reference's step on the same values,
    rounded to the parameter dtype, within one ulp of it (FMA contraction can move a float32 value
    across a rounding boundary). State starts from random values at step count 3 (bias corrections
    and Adagrad's decay in play)."""
    if available_backends()["triton"] is not True or "cpu" not in devices("triton"):
        pytest.skip("the Triton interpreter runs on CPU tensors only")
    ours_cls, _, kw = FAMILY[name]
    gen = torch.Generator().manual_seed(3)
    p16 = torch.randn(3000, generator=gen).to(dtype).requires_grad_()
    p32 = p16.detach().float().requires_grad_()
    grad = torch.randn(3000, generator=gen).to(dtype)
    opts = {}
    for p, backend in ((p16, "triton"), (p32, "reference")):
        opt = opts[backend] = ours_cls([p], backend=backend, max_grad_norm=5.0, clip_value=1.5,
                                       schedule=schedules.Cosine(10), **kw)
        names = opt.state_names(opt.param_groups[0])
        g = torch.Generator().manual_seed(4)  # the same state values for both
        # second moments above the squared first (RMSprop's centered variance stays positive)
        opt.state[p] = {"step": torch.tensor(3.0), **{
            n: (torch.rand(3000, generator=g) * 0.5 + (1.0 if n in ("exp_avg_sq", "max_exp_avg_sq", "square_avg")
                                                      else 0.0)).to(dtype).to(p.dtype) for n in names}}
        p.grad = grad.to(p.dtype)
        opt.step()
    one_ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(p16.detach().float(), p32.detach().to(dtype).float(), rtol=one_ulp, atol=1e-6)
    for n, t in opts["triton"].state[p16].items():
        if n != "step":
            ref = opts["reference"].state[p32][n]
            torch.testing.assert_close(t.float(), ref.to(dtype).float(), rtol=one_ulp, atol=1e-6, msg=n)
