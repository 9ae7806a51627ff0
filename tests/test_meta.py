"""fused_lr._meta (csrc/meta/meta.cpp) against its reference, fused_lr/core/meta.py.

The compiled ``structure`` and ``grads`` must give exactly what ``structure_py`` and ``grads_py``
give (the same bytes, the same gradient objects, the same addresses or None, the same exceptions)
for every input, and every change a user can make between steps must change the fingerprint, in
both. Without the compiled module its half of the tests is skipped with the reason the build left
in fused_lr/_meta_unbuilt.txt (or the import's error).

``python tests/test_meta.py`` prints a micro-benchmark (161 small parameters, a state of two tensors
each: microseconds per call, compiled and Python).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import time
import timeit
import warnings
from collections import OrderedDict, defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.testing._internal.two_tensor import TwoTensor

from fused_lr.core import meta

PACKAGE = Path(meta.__file__).resolve().parent.parent
UNBUILT = PACKAGE / "_meta_unbuilt.txt"


def _load():
    """fused_lr._meta, or None and why not."""
    try:
        from fused_lr import _meta
    except ImportError as e:
        if UNBUILT.is_file():
            return None, UNBUILT.read_text().strip()
        return None, f"fused_lr._meta does not import: {e}"
    return _meta, None


_META, _WHY_NOT = _load()


@pytest.fixture
def compiled():
    if _META is None:
        pytest.skip(_WHY_NOT)
    return _META


@pytest.fixture(params=["python", "compiled"])
def impl(request):
    """The (structure, grads) pair of one implementation."""
    if request.param == "python":
        return SimpleNamespace(structure=meta.structure_py, grads=meta.grads_py)
    if _META is None:
        pytest.skip(_WHY_NOT)
    return _META


# ---------------------------------------------------------------------------------------------
# inputs


def _tensors() -> list:
    """Every kind of value the lists and the state may hold."""
    base = torch.randn(4, 6)
    out = [
        torch.randn(3, 4),
        torch.nn.Parameter(torch.randn(5)),
        torch.nn.Parameter(torch.randn(2, 3), requires_grad=False),
        base.t(),  # non-contiguous
        base[1:, ::2],  # storage offset, stride 2
        base[:, 1],
        torch.tensor(2.5),  # 0-dim
        torch.empty(0),  # zero elements (address 0)
        torch.empty(3, 0, 2),
        torch.randn(3, dtype=torch.float16),
        torch.randn(3, dtype=torch.bfloat16),
        torch.randn(3, dtype=torch.float64),
        torch.randn(3, dtype=torch.complex64),
        torch.arange(4),
        torch.ones(2, dtype=torch.bool),
        torch.ones(1, 4).expand(3, 4),  # stride 0
        torch.ones(()).expand(2, 2),
        TwoTensor(torch.randn(3), torch.randn(3)),  # a subclass: opaque
        torch.empty(3, 4, device="meta"),
        torch.nn.Parameter(torch.empty(2, device="meta")),
        torch.randn(3, 4).to_sparse(),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta state"
        out.append(torch.randn(3, 4).to_sparse_csr())
    with torch.inference_mode():
        out.append(torch.randn(3))
    with contextlib.suppress(RuntimeError):  # builds without oneDNN
        out.append(torch.randn(2, 3).to_mkldnn())
    return out


_OBJECTS = [None, 1.5, 7, "name", [1, 2], (torch.randn(2),), {"a": 1}, object()]


def _cases() -> dict[str, tuple]:
    """name -> (param_lists, state)"""
    ts = _tensors()
    plain = [torch.nn.Parameter(torch.randn(n, 3)) for n in range(1, 6)]
    state = defaultdict(dict)
    for i, p in enumerate(plain):
        state[p] = {"step": torch.tensor(float(i)), "exp_avg": torch.zeros_like(p)}
    mixed = defaultdict(dict)
    mixed[ts[0]] = {"momentum_buffer": ts[3], "lr": 0.1, "names": ["a"], "tag": "x", "none": None}
    mixed[ts[1]] = 5  # not a dict
    mixed[ts[2]] = OrderedDict(m=torch.zeros(2))  # not exactly a dict
    mixed[ts[4]] = {}
    mixed["a string key"] = {"t": ts[17], "s": ts[20], "m": ts[18], "e": ts[7]}
    mixed[ts[5]] = [torch.zeros(1)]
    plain_state = {p: {"x": torch.zeros(1)} for p in plain[:2]}
    # a longer record than the helper's first guess at its length (many dims, many state tensors)
    deep = [torch.zeros([1] * 8) for _ in range(200)]
    wide = {p: {f"t{i}": torch.zeros([2] * 6) for i in range(10)} for p in deep[:60]}
    return {
        "plain": ([plain], state),
        "two groups": ([plain[:2], plain[2:]], state),
        "every tensor kind": ([ts], {}),
        "every tensor kind in the state": ([ts[:3]], {i: {"v": t} for i, t in enumerate(ts)}),
        "objects in the lists": ([ts[:2] + _OBJECTS, _OBJECTS], {}),
        "mixed state": ([ts[:6]], mixed),
        "plain dict state": ([plain], plain_state),
        "empty": ([], {}),
        "empty groups": ([[], []], defaultdict(dict)),
        "tuples": ((tuple(plain), ()), state),
        "state of tensor values": ([plain], {p: torch.zeros(1) for p in plain}),
        "long record": ([deep, deep[:50]], wide),
    }


CASES = _cases()


def _expected_variants(sig: bytes) -> list:
    flipped = bytearray(sig)
    if flipped:
        flipped[len(flipped) // 2] ^= 1
    return [
        None, sig, sig[:-8], sig + bytes(8), bytes(flipped), b"", sig[:-3], sig + b"x", bytearray(sig),
        memoryview(sig), sig.decode("latin-1"), 5, [sig],
    ]


def _outcome(fn, *args, **kwargs):
    """What a call gives: ("ok", result) or ("raised", type, message)."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 - every exception is part of the result
        return ("raised", type(e), str(e))


def _same_grads(got, want) -> None:
    assert type(got) is tuple and len(got) == 2
    grads, ptrs = got
    want_grads, want_ptrs = want
    assert type(grads) is list and len(grads) == len(want_grads)
    assert all(g is w for g, w in zip(grads, want_grads)), "not the same gradient objects"
    assert ptrs == want_ptrs
    assert (ptrs is None) == (want_ptrs is None)


# ---------------------------------------------------------------------------------------------
# (1) equivalence


@pytest.mark.parametrize("name", list(CASES))
def test_structure_equals_python(compiled, name):
    param_lists, state = CASES[name]
    want = meta.structure_py(param_lists, state)
    assert isinstance(want, bytes)
    assert compiled.structure(param_lists, state) == want
    assert compiled.structure(param_lists, state, None) == want
    assert compiled.structure(param_lists=param_lists, state=state, expected=None) == want
    for expected in _expected_variants(want):
        got = compiled.structure(param_lists, state, expected)
        assert got == meta.structure_py(param_lists, state, expected), f"expected={expected!r:.60}"
    assert compiled.structure(param_lists, state, want) is None


def test_structure_record(compiled):
    """The record itself, word by word, for one tensor and one state entry."""
    import array

    p = torch.randn(4, 6)[:, 1:3]
    t = TwoTensor(torch.randn(2), torch.randn(2))
    state = {p: {"m": t, "lr": 0.5}}
    sig = compiled.structure([[p]], state)
    words = array.array("q", sig).tolist()
    entry = state[p]
    assert words == [1, 1, id(p), id(torch.Tensor), meta.DENSE, p.data_ptr(), id(p.dtype), 0, -1, 2, 4, 2, 6, 1,
                     1, id(p), id(entry), 2, id("m"), id(t), id(TwoTensor), meta.OPAQUE, id("lr"), meta.OTHER,
                     id(entry["lr"])]
    assert sig == meta.structure_py([[p]], state)


def _odd_inputs():
    """Arguments of other types than the optimizer passes: name -> a function giving (param_lists,
    state), the same objects at every call but for fresh iterators."""
    p = torch.randn(3)
    moved = OrderedDict([(1, {"a": p}), (2, {"b": p})])
    moved.move_to_end(1)  # OrderedDict order differs from the underlying dict's

    class Seq(list):
        def __iter__(self):
            return iter(reversed(list(list.__iter__(self))))

    class Items(dict):
        def items(self):
            return [("k", self["a"])]

    seq, inner, items, lists = Seq([[p], [p, p]]), [Seq([p, 1.0])], Items(a={"x": p}), {1: [p]}
    return {
        "generator lists": lambda: ((x for x in [[p]]), {}),
        "generator params": lambda: ([(x for x in [p])], {}),
        "int lists": lambda: (5, {}),
        "int params": lambda: ([5], {}),
        "None params": lambda: ([[p], None], {}),
        "str params": lambda: (["ab"], {}),
        "dict lists": lambda: (lists, {}),
        "list subclass": lambda: (seq, {}),
        "inner list subclass": lambda: (inner, {}),
        "None state": lambda: ([[p]], None),
        "list state": lambda: ([[p]], [1, 2]),
        "OrderedDict state": lambda: ([[p]], moved),
        "dict subclass state": lambda: ([[p]], items),
        "bad items": lambda: ([[p]], SimpleNamespace(__len__=None)),
    }


ODD_INPUTS = _odd_inputs()


@pytest.mark.parametrize("name", list(ODD_INPUTS))
def test_structure_odd_arguments(compiled, name):
    want = _outcome(meta.structure_py, *ODD_INPUTS[name]())
    got = _outcome(compiled.structure, *ODD_INPUTS[name]())
    assert got == want


def test_argument_errors(compiled):
    """Wrong calls raise TypeError in both (the messages name different functions)."""
    for args, kwargs in [((), {}), (([],), {}), (([], {}, None, 1), {}), (([], {}), {"bogus": 1}),
                         (([],), {"param_lists": []}), ((), {"state": {}})]:
        with pytest.raises(TypeError):
            meta.structure_py(*args, **kwargs)
        with pytest.raises(TypeError):
            compiled.structure(*args, **kwargs)
    for args, kwargs in [((), {}), (([], []), {}), ((), {"bogus": []}), (([],), {"params": []})]:
        with pytest.raises(TypeError):
            meta.grads_py(*args, **kwargs)
        with pytest.raises(TypeError):
            compiled.grads(*args, **kwargs)
    assert compiled.grads(params=[]) == ([], [])


def test_structure_raising_tensor(compiled):
    """A plain tensor whose metadata cannot be read (a strided nested tensor has no sizes): the same
    exception as Python's."""
    with pytest.warns(UserWarning):
        nt = torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])
    want = _outcome(meta.structure_py, [[nt]], {})
    assert want[0] == "raised"
    assert _outcome(compiled.structure, [[nt]], {}) == want
    assert _outcome(compiled.structure, [[]], {0: {"nt": nt}}) == _outcome(meta.structure_py, [[]], {0: {"nt": nt}})


def test_structure_under_torch_function_mode(compiled):
    """A TorchFunctionMode sees Python's metadata reads and may change them; the compiled helper then
    answers as Python does."""

    class FakeAddress(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            return 12345 if func is torch.Tensor.data_ptr else out

    param_lists, state = CASES["plain"]
    with FakeAddress():
        want = meta.structure_py(param_lists, state)
        assert compiled.structure(param_lists, state) == want
        assert compiled.grads(param_lists[0]) == meta.grads_py(param_lists[0])
    assert compiled.structure(param_lists, state) != want


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_default_device(compiled, device):
    """`with torch.device(...)` (and torch.set_default_device) pushes a mode that passes every read
    through: the same results (read directly by the helper)."""
    param_lists, state = CASES["mixed state"]
    params = GRAD_CASES["transposed at 2"]
    with torch.device(device):
        assert compiled.structure(param_lists, state) == meta.structure_py(param_lists, state)
        _same_grads(compiled.grads(params), meta.grads_py(params))


def test_structure_metaclass_comparison(compiled):
    """type(t) in (torch.Tensor, torch.nn.Parameter) compares with ==, which a metaclass may
    redefine: Python then reads the subclass like a plain tensor, and so does the helper."""

    class Meta(type(torch.Tensor)):
        def __eq__(cls, other):
            return other is torch.Tensor or type.__eq__(cls, other)

        __hash__ = type.__hash__

    class Sneaky(torch.Tensor, metaclass=Meta):
        pass

    t = torch.Tensor._make_subclass(Sneaky, torch.randn(2, 3))
    assert type(t) in meta._PLAIN
    want = meta.structure_py([[t]], {})
    assert compiled.structure([[t]], {}) == want
    p = torch.randn(2, 3)
    p.grad = torch.ones(2, 3)
    assert compiled.grads([t, p]) == meta.grads_py([t, p])


def test_structure_copy_on_write(compiled):
    """Reading the address of a lazily cloned tensor materialises it, in both."""
    if not hasattr(torch, "_lazy_clone"):
        pytest.skip("this torch has no torch._lazy_clone")
    for fn in (meta.structure_py, compiled.structure):
        c = torch._lazy_clone(torch.randn(3))
        assert torch._C._is_cow_tensor(c)
        fn([[c]], {})
        assert not torch._C._is_cow_tensor(c)


def test_structure_mutation_during_iteration(compiled):
    """User code that isinstance runs (a __class__ property) may edit the state or a list while it
    is read: the dict iterator's errors and the list iterator's bounds, as in Python."""
    state = {}

    class Grower:
        @property
        def __class__(self):
            state[len(state) + 100] = 1
            return Grower

    entry = {"g": Grower()}

    def grown():
        state.clear()
        state[0] = entry
        return state

    want = _outcome(meta.structure_py, [], grown())
    assert want[:2] == ("raised", RuntimeError)
    assert _outcome(compiled.structure, [], grown()) == want

    params, t = [], torch.randn(2)

    class Shrinker:
        @property
        def __class__(self):
            params.clear()
            return Shrinker

    shrinker = Shrinker()

    def shrunk():
        params[:] = [shrinker, t]
        return [params]

    want = _outcome(meta.structure_py, shrunk(), {})
    assert want[0] == "ok"
    assert _outcome(compiled.structure, shrunk(), {}) == want


def _grad_cases() -> dict[str, list]:
    """name -> params (their .grad set as named)"""

    def with_grad(p, g):
        if g is not None and g.dtype != p.dtype:
            p.grad_dtype = None
        p.grad = g
        return p

    def plain_set():
        return [torch.nn.Parameter(torch.randn(3, 4)), torch.randn(5), torch.randn(2, 3).t(), torch.tensor(1.0),
                torch.empty(0)]

    def all_grads(params):
        for p in params:
            with_grad(p, torch.ones_like(p))
        return params

    cases = {"all present": all_grads(plain_set()), "none present": plain_set(), "empty": []}
    ps = all_grads(plain_set())
    ps[1].grad = None
    cases["one missing"] = ps
    for name, make_grad in {
        "another dtype": lambda p: torch.ones_like(p, dtype=torch.float64),
        "transposed": lambda p: torch.ones(4, 3).t(),
        "expanded": lambda p: torch.ones(1, 4).expand(3, 4),
        "subclass": lambda p: TwoTensor(torch.ones(3, 4), torch.ones(3, 4)),
        "sparse": lambda p: torch.ones(3, 4).to_sparse(),
        "offset view": lambda p: torch.ones(4, 4)[1:],
    }.items():
        for where in (0, 2):  # the first pair, or after a missing and a good one
            ps = all_grads([torch.randn(3, 4), torch.randn(2), torch.randn(3, 4)])
            ps[1].grad = None
            with_grad(ps[where], make_grad(ps[where]))
            cases[f"{name} at {where}"] = ps
    sub = TwoTensor(torch.randn(3), torch.randn(3))
    sub.grad = TwoTensor(torch.ones(3), torch.ones(3))
    cases["subclass param"] = [torch.randn(2), sub]
    m = torch.empty(3, device="meta")
    m.grad = torch.empty(3, device="meta")
    cases["meta"] = [m]
    cases["objects with grad"] = [SimpleNamespace(grad=None), SimpleNamespace(grad=torch.ones(2))]
    cases["object grad on a tensor-like"] = all_grads([torch.randn(2)]) + [SimpleNamespace(grad=5)]
    cases["zero-size grad"] = all_grads([torch.empty(0, 3), torch.randn(2)])
    cases["0-dim"] = all_grads([torch.tensor(3.0), torch.tensor(1, dtype=torch.int64).float()])
    cases["same shape, strides differ"] = [with_grad(torch.randn(4, 3).t(), torch.ones(3, 4))]
    return cases


GRAD_CASES = _grad_cases()


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_grads_equal_python(compiled, name):
    params = GRAD_CASES[name]
    want = meta.grads_py(params)
    _same_grads(compiled.grads(params), want)
    _same_grads(compiled.grads(tuple(params)), meta.grads_py(tuple(params)))


@pytest.mark.parametrize("params", [
    pytest.param(lambda: [1.0], id="no grad attribute"),
    pytest.param(lambda: 5, id="not iterable"),
    pytest.param(lambda: None, id="None"),
    pytest.param(lambda: (p for p in [torch.randn(2)]), id="generator"),  # zip(strict) of an exhausted one
    pytest.param(lambda: (p for p in []), id="empty generator"),
    pytest.param(lambda: {torch.randn(2): 1}, id="dict"),
])
def test_grads_odd_arguments(compiled, params):
    want = _outcome(meta.grads_py, params())
    got = _outcome(compiled.grads, params())
    if want[0] == "ok":
        assert got[0] == "ok"
        _same_grads(got[1], want[1])
    else:
        assert got == want


def test_grads_copy_on_write(compiled):
    """The addresses are read pair by pair, as in Python: a lazily cloned gradient read before the
    first mismatching pair is materialised, one after it is not."""
    if not hasattr(torch, "_lazy_clone"):
        pytest.skip("this torch has no torch._lazy_clone")

    def make():
        ps = [torch.randn(3), torch.randn(3), torch.randn(3)]
        ps[0].grad = torch._lazy_clone(torch.randn(3))
        ps[1].grad = torch.ones(6)[::2]  # strides differ: the slow path
        ps[2].grad = torch._lazy_clone(torch.randn(3))
        return ps

    for fn in (meta.grads_py, compiled.grads):
        ps = make()
        assert fn(ps)[1] is None
        assert [torch._C._is_cow_tensor(p.grad) for p in ps] == [False, False, True]


# ---------------------------------------------------------------------------------------------
# (2) every change a user can make between steps changes the fingerprint


def _model():
    groups = [[torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 4))],
              [torch.nn.Parameter(torch.randn(2, 2))]]
    state = defaultdict(dict)
    for p in groups[0] + groups[1]:
        state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p)}
    return groups, state


def _set(t, attr, value):
    setattr(t, attr, value)


CHANGES = {
    "p.data = p.data[:3] (same address)": lambda g, s: _set(g[0][0], "data", g[0][0].data[:3]),
    "p.data reshaped": lambda g, s: _set(g[0][1], "data", g[0][1].data.reshape(4, 3)),
    "p.data transposed": lambda g, s: _set(g[0][1], "data", g[0][1].data.t()),
    "p.data flattened": lambda g, s: _set(g[0][1], "data", g[0][1].data.view(12)),
    "p.data another dtype": lambda g, s: _set(g[0][0], "data", g[0][0].data.double()),
    "p.data a copy": lambda g, s: _set(g[0][0], "data", g[0][0].data.clone()),
    "list element replaced": lambda g, s: g[0].__setitem__(0, torch.nn.Parameter(torch.randn(5))),
    "list element appended": lambda g, s: g[1].append(torch.nn.Parameter(torch.randn(1))),
    "parameter moved between lists": lambda g, s: g[1].append(g[0].pop()),
    "parameters swapped": lambda g, s: g[0].reverse(),
    "group removed": lambda g, s: g.pop(),
    "state entry replaced": lambda g, s: s.__setitem__(g[0][0], dict(s[g[0][0]])),
    "state entry deleted": lambda g, s: s.__delitem__(g[0][0]),
    "state entry cleared": lambda g, s: s[g[0][0]].clear(),
    "state entry added": lambda g, s: s.__setitem__("extra", {}),
    "state tensor replaced": lambda g, s: s[g[0][1]].__setitem__("exp_avg", torch.zeros(3, 4)),
    "state tensor's .data replaced": lambda g, s: _set(s[g[0][1]]["exp_avg"], "data", torch.zeros(3, 4)),
    "state tensor's .data sliced": lambda g, s: _set(s[g[0][1]]["exp_avg"], "data", s[g[0][1]]["exp_avg"].data[:2]),
    "state value to a float": lambda g, s: s[g[0][0]].__setitem__("step", 0.0),
    "state order changed": lambda g, s: s.__setitem__(g[0][0], s.pop(g[0][0])),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_change_changes_fingerprint(impl, change):
    groups, state = _model()
    before = impl.structure(groups, state)
    assert impl.structure(groups, state, before) is None
    CHANGES[change](groups, state)
    after = impl.structure(groups, state, before)
    assert isinstance(after, bytes) and after != before
    assert after == meta.structure_py(groups, state)
    assert impl.structure(groups, state, after) is None


def test_grads_follow_changes(impl):
    """A gradient replaced or re-laid-out between steps changes grads' answer."""
    p = torch.nn.Parameter(torch.randn(3, 4))
    p.grad = torch.ones(3, 4)
    _, ptrs = impl.grads([p])
    assert ptrs == [p.grad.data_ptr()]
    p.grad = torch.zeros(3, 4)
    assert impl.grads([p])[1] == [p.grad.data_ptr()] != ptrs
    p.grad = torch.ones(4, 3).t()
    assert impl.grads([p])[1] is None
    p.data = p.data.t().contiguous().t()  # the parameter follows its gradient's layout
    assert impl.grads([p])[1] == [p.grad.data_ptr()]
    p.grad = None
    assert impl.grads([p])[1] == [0]


# ---------------------------------------------------------------------------------------------
# (3) choosing the implementation


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent), **env})


_CHOICE = """
import importlib, json, os, sys
try:  # on its own, before anything imported torch
    from fused_lr import _meta
    alone = _meta.TORCH_VERSION
except ImportError as e:
    alone = repr(e)
from fused_lr.core import meta
forced = meta.IMPL, meta.structure is meta.structure_py, meta.grads is meta.grads_py
os.environ["FUSED_LR_META"] = ""
importlib.reload(meta)
print(json.dumps({"alone": alone, "forced": forced, "default": meta.IMPL}))
"""


@functools.cache
def _choice() -> dict:
    """One interpreter, FUSED_LR_META=python at meta's import, then meta reloaded without it."""
    out = _python(_CHOICE, FUSED_LR_META="python")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_env_forces_python():
    assert _choice()["forced"] == ["python", True, True]


def test_compiled_is_used(compiled):
    assert meta.IMPL == "compiled" or os.environ.get("FUSED_LR_META") == "python"
    built_against = compiled.TORCH_VERSION
    assert built_against == str(torch.__version__)
    assert _choice()["default"] == "compiled"
    assert _choice()["alone"] == str(torch.__version__), "`from fused_lr import _meta` alone failed"


def test_refuses_another_torch(compiled):
    """Built against one torch, the module raises ImportError under another version, and
    fused_lr.core.meta falls back to Python."""
    out = _python("import torch; torch.__version__ = '0.0.1'\n"
                  "try:\n    from fused_lr import _meta\nexcept ImportError as e:\n    print('ImportError', e)\n"
                  "from fused_lr.core import meta; print(meta.IMPL)", FUSED_LR_META="")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ImportError") and "0.0.1" in lines[0] and str(torch.__version__) in lines[0]
    assert lines[-1] == "python"


# ---------------------------------------------------------------------------------------------
# (4) micro-benchmark: python tests/test_meta.py


def _bench() -> None:
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(161)]
    for p in params:
        p.grad = torch.randn_like(p)
    state = defaultdict(dict)
    for p in params:
        state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    lists = [params]
    sig = meta.structure_py(lists, state)
    impls = {"python": (meta.structure_py, meta.grads_py)}
    if _META is not None:
        impls["compiled"] = (_META.structure, _META.grads)
    else:
        print(f"compiled: skipped ({_WHY_NOT})")
    print(f"161 params, 2 state tensors each, torch {torch.__version__}: microseconds of CPU time per call "
          "(best of 7)")
    for name, (structure, grads) in impls.items():
        rows = {
            "structure(expected=None)": lambda s=structure: s(lists, state),
            "structure(expected=equal)": lambda s=structure: s(lists, state, sig),
            "grads": lambda g=grads: g(params),
        }
        for label, fn in rows.items():
            n = 200 if name == "python" else 20000
            best = min(timeit.repeat(fn, number=n, repeat=7, timer=time.process_time)) / n
            print(f"  {name:9s} {label:28s} {best * 1e6:9.2f} us  ({best * 1e9 / 161:7.1f} ns per param)")


if __name__ == "__main__":
    _bench()
