"""The kernel layout, defined once: table columns, flag bits, rule and schedule-kind codes,
``NORM_EPS`` and chunk sizes (docs/step.md, "Kernel layout").

The Numba and Triton kernels import these names; the CUDA build generates its header from this
file (``python fused_lr/core/layout.py OUT.h``, run by CMake), so no second list is written by
hand. Standard library only: the build runs it without torch or numpy.

Tables a step hands its kernels:

* tensor table, int64 ``(T, TENSOR_COLS)``, one row per tensor: the addresses of the parameter,
  its gradient, up to ``MAX_STATES`` state tensors (the rule's, in declaration order) and its
  per-parameter step count (float32), the element count, the group index, the first chunk
  (CUDA's grid numbering, which the CUDA backend writes) and whether the parameter's and state
  tensors' addresses are 16-byte aligned (a gradient's moves every step: the kernels test it);
* hyper table, float64 ``(G, HYPER_COLS)``, one row per param group: the kernel lr (base lr x the
  schedule's host scale), weight decay, the flag bits and ``RULE_COLS`` columns the rule defines;
* schedule tables, float64 ``(G, MAX_SEGMENTS, SEGMENT_COLS)`` (fused_lr.schedules);
* group clocks, float32 ``(G,)``: the schedule position k of each group;
* coefficient scratch, float64 ``(T + 1, COEF_COLS)``: per tensor, what the prepare stage
  computed for this step (lr, decoupled-decay factor, first-use flag, rule coefficients); the
  last row holds the step-wide values (clip coefficient, 1/grad_scale, go = not skipped).

A rule's coefficients are declared once, by its optimizer (``coefficients``, built with
:func:`program`): its step size ``LR`` as one of ``LR_KINDS`` and each of ``C0``..``C4`` as one of
``COEF_KINDS``, each on one of its hyper columns R_j, with t the tensor's step count after this
update. Each backend's prepare stage (Numba's ``prepare``, Triton's ``prepare_kernel``, CUDA's
``rule_coefs``) evaluates that program once per tensor and step, so an update loop only reads the
coefficients, and no prepare stage knows any rule.
"""

from __future__ import annotations

import sys


def _columns(*names: str) -> dict[str, int]:
    return {name: i for i, name in enumerate(names)}


NORM_EPS = 1e-6  # clip coefficient c = min(1, C / (N + NORM_EPS)), as clip_grad_norm_

MAX_STATES = 3
TENSOR = _columns("PARAM", "GRAD", "STATE0", "STATE1", "STATE2", "STEP", "NUMEL", "GROUP", "FIRST_CHUNK", "ALIGNED")
HYPER = _columns("LR", "WEIGHT_DECAY", "FLAGS", "R0", "R1", "R2", "R3", "R4")
COEF = _columns("LR", "DECAY", "INIT", "C0", "C1", "C2", "C3", "C4")
WIDE = _columns("CLIP_COEF", "INV_SCALE", "GO")  # columns of the scratch's last row
FLAGS = {"MAXIMIZE": 1, "DECOUPLED": 2, "NESTEROV": 4, "AMSGRAD": 8, "CENTERED": 16, "MOMENTUM": 32}
RULES = _columns("SGD", "ADAM", "RMSPROP", "ADAGRAD")
# a rule's step size from the scheduled lr: lr; lr / (1 - R_j^t); lr / (1 + (t - 1) R_j)
LR_KINDS = _columns("PLAIN", "BIAS", "DECAY")
# a rule coefficient: 0; R_j; 1 - R_j; sqrt(1 - R_j^t)
COEF_KINDS = _columns("ZERO", "COPY", "ONE_MINUS", "SQRT_BIAS")
SCHEDULE_KINDS = _columns("CONST", "STEP", "EXP", "LINEAR", "POLY", "COSINE", "COSINE_RESTARTS", "CYCLIC",
                          "ONECYCLE", "INVTIME", "INVSQRT", "POWERLAW")
SIZES = {
    "MAX_SEGMENTS": 16,   # rows of a schedule table
    "SEGMENT_COLS": 8,    # [start, kind, p0..p5]
    "NUMBA_CHUNK": 1 << 17,  # elements per Numba work item: overhead vanishes, dozens per core on ResNets
    "TRITON_BLOCK": 1024,    # elements per Triton block (8 per thread at 4 warps)
    "TRITON_CHUNK": 4096,    # elements per Triton program
    "CUDA_BLOCK": 512,       # threads per CUDA block
    "CUDA_CHUNK": 1 << 14,   # elements per CUDA block; ResNet-50: 1,667 blocks, 6.3 waves of 2 per SM (H100)
}

# A coefficient program packs six slots (LR, then C0..C4) of PROGRAM_BITS bits each, the first in the
# lowest bits; a slot is kind << 3 | j (R_j's column j < 8).
PROGRAM_BITS = 5
assert max(len(LR_KINDS), len(COEF_KINDS)) <= 1 << (PROGRAM_BITS - 3), "a kind must fit its slot's bits"

TENSOR_COLS, HYPER_COLS, COEF_COLS = len(TENSOR), len(HYPER), len(COEF)
RULE_COLS = HYPER_COLS - HYPER["R0"]
MAX_SEGMENTS, SEGMENT_COLS = SIZES["MAX_SEGMENTS"], SIZES["SEGMENT_COLS"]

# Module-level names for Python users: T_PARAM, H_LR, C_LR, W_GO, F_MAXIMIZE, RULE_SGD, K_COSINE, ...
_PREFIXED = {"T_": TENSOR, "H_": HYPER, "C_": COEF, "W_": WIDE, "F_": FLAGS, "RULE_": RULES, "K_": SCHEDULE_KINDS,
             "LRK_": LR_KINDS, "CK_": COEF_KINDS}
globals().update({prefix + name: value for prefix, table in _PREFIXED.items() for name, value in table.items()})


def program(lr: tuple[str, int], *coefs: tuple[str, int]) -> int:
    """A rule's coefficient program: ``lr`` = (an LR_KINDS name, j) and up to five (a COEF_KINDS
    name, j) for C0, C1, ...; the coefficients not given are 0. ``program(("BIAS", 0), ("ONE_MINUS",
    0))``: LR = lr / (1 - R0^t), C0 = 1 - R0."""
    if len(coefs) > RULE_COLS:
        raise ValueError(f"a rule has at most {RULE_COLS} coefficients, got {len(coefs)}")
    slots = [(LR_KINDS, lr), *((COEF_KINDS, c) for c in coefs)]
    packed = 0
    for i, (kinds, (kind, j)) in enumerate(slots):
        if kind not in kinds or not 0 <= j < RULE_COLS:
            raise ValueError(f"bad coefficient {(kind, j)!r}: kinds {sorted(kinds)}, columns 0..{RULE_COLS - 1}")
        packed |= (kinds[kind] << 3 | j) << (PROGRAM_BITS * i)
    return packed


def program_problem(packed: int) -> str | None:
    """Why ``packed`` is not a coefficient program every prepare stage evaluates, or None."""
    if not isinstance(packed, int) or not 0 <= packed < 1 << (PROGRAM_BITS * (1 + RULE_COLS)):
        return f"{packed!r} is not a packed program of {1 + RULE_COLS} slots"
    for i in range(1 + RULE_COLS):
        code = packed >> (PROGRAM_BITS * i) & ((1 << PROGRAM_BITS) - 1)
        kinds = LR_KINDS if i == 0 else COEF_KINDS
        if code >> 3 not in kinds.values() or code & 7 >= RULE_COLS:
            return f"slot {i} has kind {code >> 3} on column {code & 7} (kinds {kinds}, columns 0..{RULE_COLS - 1})"
    return None


def c_header() -> str:
    """The same constants as a C++ header (namespace flr::layout), for csrc/."""
    lines = ["// Generated from fused_lr/core/layout.py by the build: do not edit.", "#pragma once", "",
             "namespace flr {", "namespace layout {", ""]
    lines.append(f"constexpr double NORM_EPS = {NORM_EPS!r};")
    lines.append(f"constexpr int MAX_STATES = {MAX_STATES};")
    lines.append(f"constexpr int PROGRAM_BITS = {PROGRAM_BITS};")
    for name, value in SIZES.items():
        lines.append(f"constexpr long long {name} = {value};")
    for prefix, table in _PREFIXED.items():
        lines.append("")
        lines += [f"constexpr int {prefix}{name} = {value};" for name, value in table.items()]
    # every rule by code and by the name of its update in csrc/fused_lr_math.h (its RULES name,
    # capitalised): the kernels' dispatch is generated from this list
    lines += ["", "#define FLR_RULES(X) " + " ".join(f"X({code}, {name.capitalize()})" for name, code in RULES.items())]
    lines += ["", f"constexpr int TENSOR_COLS = {TENSOR_COLS};", f"constexpr int HYPER_COLS = {HYPER_COLS};",
              f"constexpr int COEF_COLS = {COEF_COLS};", f"constexpr int RULE_COLS = {RULE_COLS};", "",
              "}  // namespace layout", "}  // namespace flr", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python fused_lr/core/layout.py OUT.h")
    with open(sys.argv[1], "w") as out:
        out.write(c_header())
