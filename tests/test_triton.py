"""Triton-specific behaviour: availability, table caching, the device-side schedule, dtypes,
and that the kernels also compile for a GPU (the parity matrix runs them in the interpreter).

Compared against the reference backend with tolerances of a few ulps per step: the kernels do
the reference's operations, except the norm's reduction order and fused multiply-adds.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fused_lr import FusedAdamW, FusedSGD, available_backends, schedules
from fused_lr.backends import BackendUnavailable, devices
from fused_lr.core import layout as L

triton = pytest.importorskip("triton")
triton_step = pytest.importorskip("fused_lr.backends.triton")

RUNS = available_backends()["triton"] is True and "cpu" in devices("triton")
needs_interpreter = pytest.mark.skipif(not RUNS, reason=f"triton does not run on CPU tensors here: "
                                                        f"{available_backends()['triton']}")
# float64: same operations as the reference up to reduction order and FMA: ~1e-15 per step.
# float32: a few ulps (1.2e-7) per step.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def make_opt(params, backend, **kw):
    kw = {**dict(lr=0.1, momentum=0.9, weight_decay=1e-3, max_grad_norm=0.5), **kw}
    return FusedSGD(params, backend=backend, **kw)


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


# ----------------------------------------------------------------------------- availability
def test_unavailable_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    with pytest.raises(BackendUnavailable, match="triton is not installed"):
        triton_step.load()


def test_unavailable_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="no CUDA device, and TRITON_INTERPRET=1 is not set"):
        triton_step.load()


@needs_interpreter
def test_interpreter_runs_on_cpu_tensors():
    assert devices("triton") == frozenset({"cpu"})
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = FusedSGD([p], lr=0.5, backend="triton")
    opt.step()
    assert opt.backend == "triton"
    torch.testing.assert_close(p.detach(), torch.full((3,), -0.5))


# ----------------------------------------------------------------------------- table caching
def fill_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


@needs_interpreter
def test_tables_are_reused_while_nothing_moves():
    params = [torch.randn(n, dtype=torch.float64, requires_grad=True) for n in (5, 300, 7)]
    opt = make_opt(params, "triton", schedule=schedules.Cosine(10))
    fill_grads(params, 0)
    opt.step()  # builds the tables
    backend = opt._backend
    built, hyper, tensors = backend.rebuilds, backend._hyper, backend._tables.tensors
    for _ in range(3):
        for p in params:  # new gradient values, same tensors
            p.grad.normal_()
        opt.step()
    assert backend.rebuilds == built == 1
    opt.param_groups[0]["lr"] = 0.05  # a hyper-parameter change re-uploads only the hyper rows, in place
    opt.step()
    assert backend.rebuilds == built and backend._hyper is hyper and backend._tables.tensors is tensors
    assert float(hyper[0, L.H_LR]) == 0.05


@needs_interpreter
def test_tables_follow_moved_tensors():
    """model.to(float64) and zero_grad(set_to_none=True) + fresh grads reallocate everything the
    tables point at: the step must notice, rebuild, and still equal the reference."""
    ref = [torch.randn(n, requires_grad=True) for n in (4, 1000, 33)]
    got = clone_params(ref)
    opts = [make_opt(ref, "reference", schedule=schedules.Exponential(0.9)),
            make_opt(got, "triton", schedule=schedules.Exponential(0.9))]
    live = []  # keeps replaced tensors alive, so new ones cannot reuse their addresses
    for step in range(6):
        if step == 3:  # what model.to(float64) does to each parameter (buffers stay float32)
            for params in (ref, got):
                for p in params:
                    live += [p.data, p.grad]
                    p.data = p.data.double()
                    p.grad = None
        before = opts[1]._backend.rebuilds if step else 0
        moved = step in (0, 3)
        for params, opt in zip((ref, got), opts, strict=True):
            opt.zero_grad(set_to_none=True)
            fill_grads(params, step)
            live += [p.grad for p in params]
            opt.step()
        # new parameters rebuild the tables; new gradients only rewrite their addresses
        assert (opts[1]._backend.rebuilds > before) == moved
        for r, g in zip(ref, got, strict=True):
            torch.testing.assert_close(g, r, **TOL[torch.float32])
    # the buffers follow their parameters' dtype, as torch's load_state_dict casts state
    assert got[0].dtype == torch.float64 and opts[1].state[got[0]]["momentum_buffer"].dtype == torch.float64


@needs_interpreter
def test_a_gradient_at_an_unaligned_address_gets_a_scalar_span():
    """The plan's ALIGNED column covers parameter and state; the backend adds each gradient's own
    address, so a gradient 4 bytes past a 16-byte boundary moves its row to an unaligned span
    (vector loads there would be misaligned on a GPU), and back once it is aligned again."""
    ref = [torch.randn(n, requires_grad=True) for n in (40, 1000)]
    got = clone_params(ref)
    opts = [make_opt(ref, "reference"), make_opt(got, "triton")]
    for step, offset in enumerate((0, 1, 0)):
        for params, opt in zip((ref, got), opts, strict=True):
            for i, p in enumerate(params):
                base = torch.full((p.numel() + 4,), 0.01 * (step + 1))
                p.grad = base[offset:offset + p.numel()] if i == 0 else base[:p.numel()].clone()
            opt.step()
        assert [span[3] for span in opts[1]._backend._tables.spans] == ([True] if offset == 0 else [True, False])
        for r, g in zip(ref, got, strict=True):
            torch.testing.assert_close(g, r, **TOL[torch.float32])


@needs_interpreter
def test_strided_params_and_grads():
    """A transposed parameter with a contiguous gradient has no common flat layout: the backend
    works on contiguous copies and writes the results back."""
    base = [torch.randn(5, 3, dtype=torch.float64).t(), torch.randn(2, 3, 4, 5, dtype=torch.float64)]
    ref = [b.clone().requires_grad_() for b in base]
    got = [b.clone().requires_grad_() for b in base]  # clone keeps the strides
    got[1].data = got[1].data.to(memory_format=torch.channels_last)  # dense, not contiguous: no copy needed
    for params, backend in ((ref, "reference"), (got, "triton")):
        opt = make_opt(params, backend)
        for step in range(3):
            fill_grads(params, step)
            params[1].grad = params[1].grad.to(memory_format=torch.channels_last)
            opt.step()
    assert not got[0].is_contiguous() and got[1].is_contiguous(memory_format=torch.channels_last)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


# ----------------------------------------------------------------------------- AMP
@needs_interpreter
def test_skipped_first_step_changes_nothing_then_initialises_momentum():
    """docs/step.md, "The stock fused SGD defect": a first step skipped for an inf gradient must leave no
    trace (no param, buffer or step change), and the next step must start the buffer from the
    gradient."""
    p = torch.zeros(4, requires_grad=True)
    opt = FusedSGD([p], lr=0.1, momentum=0.9, max_grad_norm=10.0, backend="triton")
    p.grad = torch.full((4,), float("inf"))
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(4))
    assert float(opt.state[p]["step"]) == 0
    p.grad = torch.full((4,), 2.0)  # a unit gradient, scaled by 2
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), -0.1))
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.ones(4))
    assert float(opt.state[p]["step"]) == 1


# ----------------------------------------------------------------------------- schedules
def _plateau():
    s = schedules.ReduceOnPlateau(schedules.Cosine(10), patience=0)
    s.step(1.0)
    s.step(2.0)  # no improvement: the host factor drops to 0.1
    return s


SCHEDULES = {
    "constant": schedules.Constant(0.5),
    "step": schedules.Step(3, 0.5),
    "step-negative-gamma": schedules.Step(2, -0.5),
    "multistep": schedules.MultiStep([2, 5, 9], 0.3),
    "exponential": schedules.Exponential(0.9),
    "linear": schedules.Linear(0.2, 1.0, 7),
    "polynomial": schedules.Polynomial(10, 2.0, 0.1),
    "polynomial-sqrt": schedules.Polynomial(10, 0.5),
    "cosine": schedules.Cosine(12, 0.1),
    "restarts": schedules.CosineRestarts(4),
    "restarts-growing": schedules.CosineRestarts(3, 2, 0.05),
    "cyclic": schedules.Cyclic(3.0, 4),
    "cyclic-triangular2": schedules.Cyclic(2.0, 3, 5, mode="triangular2"),
    "cyclic-exp-range": schedules.Cyclic(2.0, 3, mode="exp_range", gamma=0.9),
    "onecycle": schedules.OneCycle(20),
    "onecycle-linear": schedules.OneCycle(20, anneal="linear"),
    "inverse-time": schedules.InverseTime(0.5, 2, 1.5),
    "inverse-sqrt": schedules.InverseSqrt(4),
    "power-law": schedules.PowerLaw(0.1, 2.0, 15),
    "warmup-cosine": schedules.Warmup(3, schedules.Cosine(10), start_factor=0.1),
    "join": schedules.Join([(schedules.Constant(1.0), 2), (schedules.Exponential(0.8), 5),
                            schedules.Linear(1.0, 0.0, 10)]),
    "plateau": _plateau(),
}
KS = [*range(40), 100, 1000, 12345]


@needs_interpreter
def test_device_schedule_equals_host_schedule():
    """One step of a parameter whose step count is k moves it by lr x the schedule at k: one
    group per schedule, one scalar parameter per k, all evaluated by the kernels in a single step.
    The kernels mirror eval_table (whose equality with each schedule's formula is the schedule
    tests' business). Tolerance: the kernels' pow is exp(y log x), off by ~(1 + |y log x|) ulp,
    so 1e-12 relative."""
    groups, expected, clocks = [], [], []
    for sched in SCHEDULES.values():
        for k in KS:
            groups.append(dict(params=[torch.zeros(1, dtype=torch.float64, requires_grad=True)], schedule=sched))
            expected.append(-0.5 * sched.host_scale * schedules.eval_table(sched.table(), k))
            clocks.append(float(k))
    opt = FusedSGD(groups, lr=0.5, backend="triton")
    sd = opt.state_dict()
    for g, k in zip(sd["param_groups"], clocks, strict=True):
        g["schedule_step"] = torch.tensor(k)  # each group's clock at its k
    opt.load_state_dict(sd)
    for group in groups:
        group["params"][0].grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    got = torch.cat([group["params"][0].detach() for group in groups])
    names = [f"{name}@k={k}" for name in SCHEDULES for k in KS]
    bad = [(n, float(g), e) for n, g, e in zip(names, got, expected, strict=True)
           if abs(float(g) - e) > 1e-12 * abs(e) + 1e-300]
    assert not bad, bad[:10]
    assert [float(g["schedule_step"]) for g in opt.state_dict()["param_groups"]] == [k + 1.0 for k in clocks]


# ----------------------------------------------------------------------------- dtypes
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [0, 3], ids=["first-step", "momentum-step"])
def test_half_precision_is_float32_math_rounded_once(dtype, k):
    """16-bit parameters are computed in float32 and rounded once: the result equals the
    float32 reference rounded to the parameter dtype within one ulp (FMA contraction can move
    the float32 value across a rounding boundary)."""
    gen = torch.Generator().manual_seed(k)
    p16 = torch.randn(3000, generator=gen).to(dtype).requires_grad_()
    p32 = p16.detach().float().requires_grad_()
    buf = torch.randn(3000, generator=gen).to(dtype)
    grad = torch.randn(3000, generator=gen).to(dtype)
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, max_grad_norm=5.0, clip_value=1.5,
              schedule=schedules.Cosine(10))
    for p, backend in ((p16, "triton"), (p32, "reference")):
        opt = FusedSGD([p], backend=backend, **kw)
        p.grad = grad.to(p.dtype)
        opt.state[p] = {"step": torch.tensor(float(k)), "momentum_buffer": buf.to(p.dtype, copy=True)}
        opt.step()
    one_ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(p16.detach().float(), p32.detach().to(dtype).float(), rtol=one_ulp, atol=1e-6)


@needs_interpreter
def test_mixed_dtypes_and_empty_tensors():
    """float32 and float64 parameters together take one launch per dtype, with a float64 norm;
    a zero-element parameter only has its step counted."""
    shapes = [((7,), torch.float32), ((0,), torch.float32), ((300,), torch.float64), ((65,), torch.float32),
              ((2, 9), torch.float64)]
    ref = [torch.randn(s, dtype=d, requires_grad=True) for s, d in shapes]
    got = clone_params(ref)
    norms = []
    for params, backend in ((ref, "reference"), (got, "triton")):
        opt = make_opt(params, backend, clip_value=0.5, schedule=schedules.Step(2, 0.5))
        for step in range(3):
            fill_grads(params, step)
            opt.step()
        norms.append(opt.last_grad_norm)
        assert {float(opt.state[p]["step"]) for p in params} == {3.0}
    assert norms[1].dtype == torch.float64
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-13, atol=0)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, **TOL[r.dtype])


@needs_interpreter
def test_norm_is_deterministic():
    params = [torch.randn(n, requires_grad=True) for n in (70000, 5, 1234)]
    opt = make_opt(params, "triton", lr=0.0)
    fill_grads(params, 0)
    norms = []
    for _ in range(2):
        opt.step()
        norms.append(opt.last_grad_norm.clone())
    assert torch.equal(norms[0], norms[1])


@needs_interpreter
def test_norm_summed_by_prepare_equals_its_own_launch():
    """The norm's partials summed by prepare_kernel (nothing reads the norm before the update) and by
    sqrt_sum_kernel (error_if_nonfinite reads it first) give the same bits, and the same step as the
    reference (tensors large enough for many programs, so the norm takes a final sum)."""
    base = [torch.randn(n, dtype=torch.float64) for n in (300000, 5, 1234)]
    runs = {}
    for name, backend, check in (("prepare", "triton", False), ("own launch", "triton", True),
                                 ("reference", "reference", False)):
        params = [b.clone().requires_grad_() for b in base]
        opt = make_opt(params, backend, error_if_nonfinite=check)
        for step in range(2):
            fill_grads(params, step)
            opt.step()
        assert opt.backend == backend
        runs[name] = (params, opt.last_grad_norm)
    assert torch.equal(runs["prepare"][1], runs["own launch"][1])
    torch.testing.assert_close(runs["prepare"][1], runs["reference"][1], **TOL[torch.float64])
    for a, b, r in zip(runs["prepare"][0], runs["own launch"][0], runs["reference"][0], strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, **TOL[torch.float64])


# ----------------------------------------------------------------------------- compiled mode
_COMPILE_ALL = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fused_lr.kernels import triton_kernels as K
    from fused_lr import FusedAdagrad, FusedAdam, FusedRMSprop, FusedSGD
    from fused_lr.core import layout as L

    ALL_KINDS = sum(1 << k for k in range(12))
    def compile(fn, sig, const):
        sig = {**sig, **{name: "constexpr" for name in const}}
        src = ASTSource(fn=fn, signature=sig, constexprs=const)
        for arch in (80, 90):
            ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": True}).asm["ptx"]
            for op in ("div.full.f32", "div.approx", "sqrt.approx"):
                if op in ptx:
                    print(f"APPROX {op} in {fn.__name__} {const.get('DTYPE')} {const.get('RULE')} sm_{arch}")

    tables = {"tensors": "*i64", "chunks": "*i64", "n_chunks": "i32", "hyper": "*fp64", "n_groups": "i32"}
    for dtype, ptr in ((tl.float32, "*fp32"), (tl.float64, "*fp64"), (tl.bfloat16, "*fp32")):
        acc = "*fp64" if dtype == tl.float64 else "*fp32"
        for flag in (False, True):
            for rule in (K._sgd, K._adam, K._rmsprop, K._adagrad):
                compile(K.update_kernel, {**tables, "n_tensors": "i32", "coefs": "*fp64"},
                        dict(DTYPE=dtype, RULE_FN=rule, FEATURES=sum(L.FLAGS.values()) if flag else 0, HAS_CLIP=flag,
                             HAS_CLIP_VALUE=flag, HAS_SCALE=flag, MAXIMIZE=flag, COUPLED_WD=flag, DECOUPLED_WD=flag,
                             ALIGNED=flag, ROWS=1, BLOCK=1024, CHUNK=4096))
            compile(K.sumsq_kernel, {**tables, "partials": "*fp64", "out": acc, "scale": "*fp32"},
                    dict(DTYPE=dtype, HAS_SCALE=flag, HAS_CLIP_VALUE=flag, FINAL=flag, ALIGNED=flag, ROWS=1,
                         BLOCK=1024, CHUNK=4096))
        compile(K.sqrt_sum_kernel, {"partials": "*fp64", "n": "i32", "out": acc}, dict(BLOCK=1024))
    prepare = {"tensors": "*i64", "n_tensors": "i32", "hyper": "*fp64", "tables": "*fp64", "clocks": "*fp32",
               "n_groups": "i32", "coefs": "*fp64", "partials": "*fp64", "n_partials": "i32", "scale": "*fp32",
               "found": "*fp32", "lrs": "*i64"}
    programs = [cls.coefficients for cls in (FusedSGD, FusedAdam, FusedRMSprop, FusedAdagrad)]
    for norm in ("*fp32", "*fp64"):
        for program in programs:
            for finish in (False, True):
                compile(K.prepare_kernel, {**prepare, "norm": norm},
                        dict(HAS_LR_TENSORS=finish, HAS_CLIP=True, HAS_RATE=True, HAS_SCALE=True, HAS_FOUND=True,
                             FINISH=finish, PROGRAM=program, KINDS=ALL_KINDS, BLOCK=128, SUM_BLOCK=1024))
    compile(K.prepare_kernel, {**prepare, "norm": "*fp32"},
            dict(HAS_LR_TENSORS=False, HAS_CLIP=False, HAS_RATE=False, HAS_SCALE=False, HAS_FOUND=False, FINISH=False,
                 PROGRAM=programs[0], KINDS=1, BLOCK=128, SUM_BLOCK=1024))
    print("compiled")
""")


def test_kernels_compile_for_a_gpu():
    """The interpreter accepts code that the GPU compiler rejects (a float64 div_rn, branch
    types): compile every kernel variant down to a cubin for sm_80 and sm_90, which needs no GPU,
    and find no approximate division or square root in their PTX.
    In a child process, since this one runs the interpreter."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", _COMPILE_ALL], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
    # IEEE arithmetic, as torch, the reference and the CUDA kernels (no approximate division or root)
    assert "APPROX" not in done.stdout, done.stdout[:3000]


@needs_interpreter
def test_bfloat16_trajectory_rounds_to_nearest_even_as_torch():
    """25 AdamW steps on bfloat16 parameters against torch's AdamW on the same: every store rounds
    to nearest even (the interpreter's own float32 -> bfloat16 cast truncates: 0.039 off after 5
    steps). Tolerance 2^-7 absolute, one bfloat16 ulp at 1, the scale of these N(0, 1)
    parameters: torch rounds every intermediate of a step to bfloat16 (2^-8 relative each) where
    the kernel computes in float32 and rounds once at the store, so the two part by about a
    rounding, and do not drift apart: measured 0.0059 after 5 steps and after 25, against 0.039
    after 5 with truncating stores."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).bfloat16() for s in ((33, 17), (100,))]
    ours = [torch.nn.Parameter(b.clone()) for b in base]
    theirs = [torch.nn.Parameter(b.clone()) for b in base]
    opt = FusedAdamW(ours, lr=1e-3, weight_decay=0.1, backend="triton")
    ref = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.1, foreach=False)
    for _ in range(25):
        for a, b in zip(ours, theirs, strict=True):
            g = torch.randn(a.shape, generator=gen).bfloat16()
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert opt.backend == "triton"
    worst = max(float((a.detach().float() - b.detach().float()).abs().max()) for a, b in zip(ours, theirs, strict=True))
    assert worst <= 2.0 ** -7, worst


class _CountedKernel:
    """A kernel whose launches are counted, not run (sqrt_sum_kernel writes a norm of 1, which the
    host's non-finite check reads)."""

    def __init__(self, name, counts):
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        self.counts.append((self.name, kwargs.get("FINISH")))
        if self.name == "sqrt_sum_kernel":
            args[2].fill_(1.0)


@needs_interpreter
@pytest.mark.parametrize("check", [False, True], ids=["clip", "clip-error_if_nonfinite"])
def test_launches_per_step(check):
    """ResNet-50's 161 float32 tensors with clipping, chunked as on a GPU (a program per chunk):
    sumsq_kernel, prepare_kernel (which sums the partials into the norm) and update_kernel, three
    launches a step; sqrt_sum_kernel sums the norm on its own only when the host reads it before
    the update (error_if_nonfinite)."""
    import types

    from fused_lr.backends.triton import TritonBackend
    from fused_lr.tools.bench.host import tiny_resnet50_groups

    groups = tiny_resnet50_groups()
    opt = FusedSGD(groups, lr=0.1, momentum=0.9, max_grad_norm=0.5, error_if_nonfinite=check, backend="reference")
    backend = opt._backend = TritonBackend()
    counts = []
    k = backend._k
    backend._k = types.SimpleNamespace(**{n: getattr(k, n) for n in dir(k) if not n.endswith("_kernel")},
                                       **{n: _CountedKernel(n, counts) for n in dir(k) if n.endswith("_kernel")})
    backend._interpreted = False  # a GPU's chunking: a program per chunk, so the norm needs a final sum
    backend.devices = frozenset({"cpu"})
    params = [p for g in groups for p in g["params"]]
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        counts.clear()
        opt.step()
        if check:
            assert counts == [("sumsq_kernel", None), ("sqrt_sum_kernel", None), ("prepare_kernel", False),
                              ("update_kernel", None)]
        else:
            assert counts == [("sumsq_kernel", None), ("prepare_kernel", True), ("update_kernel", None)]
    assert opt.backend == "triton"


@needs_interpreter
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float16], ids=["float32-lr", "float16-lr-staged"])
def test_tensor_lrs_read_on_the_device(lr_dtype):
    """A float32 lr tensor is read at its address by prepare_kernel; one of another dtype is staged
    into a float64 slot each step. Either way the reference's numbers, after the lr tensor changed
    in place. float64 parameters: the same operations (TOL)."""
    base = [torch.randn(n, dtype=torch.float64) for n in (7, 300)]
    runs = []
    for backend in ("triton", "reference"):
        params = [b.clone().requires_grad_() for b in base]
        lr = torch.tensor(0.1, dtype=lr_dtype)
        opt = make_opt(params, backend, lr=lr, schedule=schedules.Cosine(6))
        for step in range(4):
            if step == 2:
                lr.fill_(0.05)
            fill_grads(params, step)
            opt.step()
        assert opt.backend == backend
        runs.append(params)
    for got, want in zip(*runs, strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
