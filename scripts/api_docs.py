"""Write docs/api.md, the API reference, from the code.

    python scripts/api_docs.py           # rewrite docs/api.md
    python scripts/api_docs.py --check   # exit 1 if docs/api.md differs from what the code gives

Everything the page states about an argument comes from the code: the signatures
(``inspect.signature``), the docstrings, and the values each argument accepts, which are read from
the optimizers' own error messages (each optimizer is built with a value no check accepts, and the
message says what it must be). What the code does not say, the meaning of each torch argument, is in
``MEANING`` below; an argument without an entry there stops the script, so a new argument cannot go
undocumented. tests/test_docs.py fails when docs/api.md is stale.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api.md"
OPTIMIZERS = ("FusedSGD", "FusedAdam", "FusedAdamW", "FusedRMSprop", "FusedAdagrad")
WIDTH = 100  # signature lines wrap here

# What each of the torch arguments means (torch's meaning: the fused optimizers keep it). Keyed by
# argument name, or by (class name, argument name) where one optimizer means something else.
MEANING = {
    "params": "the parameters: tensors, `(name, tensor)` pairs, or param-group dicts",
    "lr": "base learning rate, multiplied by the schedule's factor; a tensor is read on the device every step",
    "weight_decay": "λ: adds λ·p to the gradient, or decays p ← p·(1 − η·λ) when decoupled",
    ("FusedAdamW", "weight_decay"): "λ, decoupled: p ← p·(1 − η·λ)",
    "decoupled_weight_decay": "decay the weights directly, p ← p·(1 − η·λ), instead of adding λ·p to the gradient",
    ("FusedAdam", "decoupled_weight_decay"): "decouple the weight decay: `True` makes it AdamW",
    "maximize": "ascend the objective instead of descending it",
    "momentum": "momentum factor μ; 0 turns momentum off",
    ("FusedRMSprop", "momentum"): "momentum factor μ; 0 keeps no momentum buffer",
    "dampening": "dampening τ: the momentum buffer adds (1 − τ)·g",
    "nesterov": "Nesterov momentum (needs momentum > 0 and dampening 0)",
    "betas": "(β₁, β₂): decay rates of the first and second moment averages",
    "eps": "ε, added to the denominator",
    "amsgrad": "divide by the running maximum of the second moment (`max_exp_avg_sq`)",
    "alpha": "smoothing constant of the squared-gradient average",
    "centered": "subtract the squared average gradient (keeps `grad_avg`)",
    "lr_decay": "the lr is divided by 1 + (t − 1)·lr_decay at a parameter's t-th update",
    "initial_accumulator_value": "where every `sum` starts; the constructor's value holds for every group, as in torch",
}

# Members every optimizer has that the code documents nowhere else (attributes, and torch methods
# overridden without a docstring of their own). Each must exist: render() checks.
MEMBERS_WITHOUT_DOCSTRING = {
    "last_grad_norm": "The global gradient norm of the last step, a 0-dim tensor on the parameters' device (no "
                      "host sync to read it later); None before the first step, or when nothing asked for the norm "
                      "(`max_grad_norm`, `error_if_nonfinite`, `lr_norm_power`).",
    "state_dict": "torch's layout plus each parameter's `step` and each group's `schedule_step`; schedules are not "
                  "saved (docs/step.md, \"State and checkpoints\").",
    "load_state_dict": "Checks the whole checkpoint before it changes anything; a rejected one leaves the "
                       "optimizer as it was (docs/step.md, \"Memory safety\").",
}


class _Unaccepted:
    """A value that no argument check accepts; its repr stays out of the harvested wording."""

    def __repr__(self) -> str:
        return "<unaccepted>"


def markdown(doc: str | None) -> str:
    """A docstring in Markdown: Sphinx roles and double backticks become code spans."""
    if not doc:
        return ""
    # :class:`~a.b.C` shows as `C`, :class:`a.b.C` as `a.b.C`
    doc = re.sub(r":(?:class|func|meth|mod|attr|data):`(~?)([^`]+)`",
                 lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", doc)
    return doc.replace("``", "`")


def own_docstring(obj) -> str | None:
    """``obj``'s docstring, or None when it has none of its own (a dataclass's generated one)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    if doc is None or (isinstance(obj, type) and dataclasses.is_dataclass(obj) and doc.startswith(obj.__name__ + "(")):
        return None
    return inspect.cleandoc(doc)


def default_repr(cls, param: inspect.Parameter) -> str:
    if param.default is inspect.Parameter.empty:
        return ""
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.name == param.name and f.default_factory is not dataclasses.MISSING:
                return repr(f.default_factory())
    return repr(param.default)


def signature_line(name: str, params: list[inspect.Parameter], cls=None) -> str:
    """``name(a, b=1, *, c=2)`` wrapped at WIDTH with the continuation under the first argument."""
    items, star = [], False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star:
            items.append("*")
            star = True
        default = default_repr(cls, p)
        items.append(f"{p.name}={default}" if default else p.name)
    if not items:
        return f"{name}()"
    lines, line = [], f"{name}("
    indent = " " * len(line)
    for i, item in enumerate(items):
        piece = item + (", " if i < len(items) - 1 else ")")
        if len(line) + len(piece.rstrip()) > WIDTH and line.strip() != f"{name}(":
            lines.append(line.rstrip())
            line = indent
        line += piece
    lines.append(line)
    return "\n".join(lines)


def _super_keywords(cls) -> set[str]:
    """The keyword arguments ``cls.__init__`` passes to ``super().__init__`` by name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__":
            names |= {k.arg for k in node.keywords if k.arg is not None}
    return names


def constructor_params(cls) -> list[tuple[inspect.Parameter, type]]:
    """Every argument the constructor takes, with the class that declares it: a ``**kwargs`` passed
    on to the parent adds the parent's keyword-only arguments, but not those this class sets itself."""
    sig = inspect.signature(cls.__init__)
    own = [p for p in sig.parameters.values() if p.name != "self" and p.kind is not p.VAR_KEYWORD]
    out = [(p, cls) for p in own]
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        parent = next(c for c in cls.__mro__[1:] if "__init__" in c.__dict__)
        skip = {p.name for p in own} | _super_keywords(cls)
        out += [(p, owner) for p, owner in constructor_params(parent)
                if p.kind is p.KEYWORD_ONLY and p.name not in skip]
    return out


def accepted(cls, name: str) -> str:
    """What ``cls`` accepts for argument ``name``, in the words of its own error message."""
    import torch

    def message(value) -> str:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls([torch.zeros(1, requires_grad=True)], **{name: value})
        except (TypeError, ValueError) as e:
            return str(e)
        raise RuntimeError(f"{cls.__name__} accepted {value!r} for {name}: no wording to harvest")

    def words(text: str) -> str:
        if m := re.search(rf"\b{re.escape(name)} must be (.+?), got\b", text):
            return m.group(1)
        if m := re.search(r"choose one of \((.+)\)$", text):
            return "one of " + m.group(1)
        raise RuntimeError(f"{cls.__name__}: no 'must be' wording for {name} in {text!r}")

    text = words(message(_Unaccepted()))
    if name == "lr":  # a tensor lr has checks of its own
        text += ", or " + re.search(r"must be (.+?), got", message(torch.zeros(2))).group(1)
    return text


def state_keys(cls) -> str:
    """The state tensors a parameter gets: those kept at the defaults, then those an option adds."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls([torch.zeros(1, requires_grad=True)])
    group = opt.param_groups[0]
    base = opt.state_names(group)
    parts = [", ".join(f"`{s}`" for s in base) + " always"] if base else []
    for h in cls.hypers:
        if h.rule[1] == "True or False":
            change, what = True, f"with `{h.name}`"
        elif h.default == 0:
            change, what = 0.5, f"with `{h.name}` > 0"
        else:
            continue
        added = [s for s in opt.state_names({**group, h.name: change}) if s not in base]
        if added:
            parts.append(", ".join(f"`{s}`" for s in added) + " " + what)
    parts.append("`step` (float32, per parameter)")
    return "; ".join(parts)


def meaning(cls_name: str, name: str) -> str:
    text = MEANING.get((cls_name, name), MEANING.get(name))
    if text is None:
        raise RuntimeError(f"scripts/api_docs.py: no MEANING entry for {cls_name}'s argument {name!r}")
    return text


def shared_bullets(doc: str) -> dict[str, str]:
    """``name -> bullet`` for each keyword the base constructor's docstring describes in a bullet."""
    bullets = re.findall(r"^- (.+?)(?=^- |\Z)", doc, flags=re.M | re.S)
    out = {}
    for b in bullets:
        head = b.split(":", 1)[0]
        for name in re.findall(r"`(\w+)`", head):
            out[name] = b.strip()
    return out


def render() -> str:
    import fused_lr
    from fused_lr import backends, schedules
    from fused_lr.core.optimizer import FusedOptimizer

    out = ["# API reference", "",
           "Generated from the code by `scripts/api_docs.py` (signatures, docstrings, and the values each",
           "argument accepts, in the words of the optimizers' own checks); `tests/test_docs.py` fails when this",
           "page is stale. Edit the code or the script, then run `python scripts/api_docs.py`.",
           "What a step computes is [step.md](step.md); how the optimizers differ from `torch.optim`,",
           "[differences.md](differences.md).", "",
           "Contents: [optimizers](#optimizers) · [shared keywords](#shared-keywords) ·",
           "[methods and attributes](#methods-and-attributes) · [schedules](#schedules) ·",
           "[fused_lr.param_groups](#fused_lrparam_groups) ·",
           "[fused_lr.available_backends](#fused_lravailable_backends)",
           ""]

    base_doc = markdown(inspect.getdoc(FusedOptimizer.__init__))
    shared = [p for p in inspect.signature(FusedOptimizer.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    shared_names = {p.name for p in shared}

    out += ["## Optimizers", "",
            "Each takes its torch counterpart's arguments, in torch's positional order up to the first one it",
            "leaves out, then keyword-only ones, then the [shared keywords](#shared-keywords).", ""]
    for name in OPTIMIZERS:
        cls = getattr(fused_lr, name)
        params = constructor_params(cls)
        out += [f"### {name}", "", "```python", signature_line(name, [p for p, _ in params], cls), "```", "",
                markdown(own_docstring(cls)), "",
                "| argument | default | accepts | meaning |", "|---|---|---|---|"]
        for p, owner in params:
            if owner is FusedOptimizer:
                continue
            default = default_repr(cls, p) or "required"
            accepts = "" if p.name == "params" else accepted(cls, p.name)
            out.append(f"| `{p.name}` | `{default}` | {accepts} | {meaning(name, p.name)} |"
                       if default != "required" else f"| `{p.name}` | required | {accepts} | {meaning(name, p.name)} |")
        missing = shared_names - {p.name for p, owner in params if owner is FusedOptimizer}
        if missing:
            raise RuntimeError(f"{name} does not take the shared keywords {sorted(missing)}")
        out += ["", f"State per parameter: {state_keys(cls)}.", ""]

    out += ["## Shared keywords", "",
            "Every optimizer takes these, keyword-only (`fused_lr.core.optimizer.FusedOptimizer`):", "",
            "| keyword | default | accepts |", "|---|---|---|"]
    for p in shared:
        out.append(f"| `{p.name}` | `{default_repr(None, p)}` | {accepted(fused_lr.FusedSGD, p.name)} |")
    bullets = shared_bullets(base_doc)
    undocumented = shared_names - set(bullets)
    if undocumented:
        raise RuntimeError(f"FusedOptimizer.__init__'s docstring has no bullet for {sorted(undocumented)}")
    out += ["", "From the base constructor's docstring:", ""]
    seen = []
    for p in shared:
        if bullets[p.name] not in seen:
            seen.append(bullets[p.name])
    out += [f"- {b}" for b in seen]
    out.append("")

    out += ["## Methods and attributes", "", "Every optimizer has torch's (`zero_grad`, `add_param_group`, "
            "`param_groups`, `state`, the hooks) and these:", ""]
    probe = fused_lr.FusedSGD([__import__("torch").zeros(1, requires_grad=True)])
    for member in ("step", "current_lr", "backend", "last_grad_norm", "state_dict", "load_state_dict"):
        if not hasattr(probe, member):
            raise RuntimeError(f"optimizers have no {member!r} any more")
        attr = inspect.getattr_static(FusedOptimizer, member, None)
        if member in MEMBERS_WITHOUT_DOCSTRING:
            text, call = MEMBERS_WITHOUT_DOCSTRING[member], member if attr is None else f"{member}()"
        elif isinstance(attr, property):
            text, call = markdown(inspect.getdoc(attr)), member
        else:
            sig = inspect.signature(attr)
            params = [p for p in sig.parameters.values() if p.name != "self"]
            text, call = markdown(inspect.getdoc(attr)), signature_line(member, params)
        out += [f"- `{call}`: " + " ".join(text.split())]
    share = fused_lr.FusedAdagrad.share_memory
    out += ["- `FusedAdagrad.share_memory()`: " + " ".join(markdown(inspect.getdoc(share)).split()), ""]

    out += ["## Schedules", "",
            "`fused_lr.schedules`: pure functions of a group's clock `k` that give a factor of its base lr. "
            "The formulas,", "their torch counterparts and the kernel table are in docs/step.md, "
            "[\"Schedules\"](step.md#schedules).", ""]
    base = schedules.Schedule
    out += ["### Schedule", "", markdown(own_docstring(base)), ""]
    for member in ("__call__", "table", "host_scale", "is_constant"):
        attr = inspect.getattr_static(base, member)
        doc = (attr.fget if isinstance(attr, property) else attr).__doc__  # its own, not object's
        if doc:
            doc = inspect.cleandoc(doc)
            label = member if isinstance(attr, property) else f"{member}(k)" if member == "__call__" else f"{member}()"
            out.append(f"- `{label}`: " + " ".join(markdown(doc).split()))
    out.append("")
    classes = [c for _, c in inspect.getmembers(schedules, inspect.isclass)
               if issubclass(c, base) and c is not base and c.__module__ == schedules.__name__]
    classes.sort(key=lambda c: inspect.getsourcelines(c)[1])
    for cls in classes:
        params = list(inspect.signature(cls).parameters.values())
        out += [f"### {cls.__name__}", "", "```python", signature_line(cls.__name__, params, cls), "```", ""]
        if doc := own_docstring(cls):
            out += [markdown(doc), ""]
        methods = [m for m in ("step", "state_dict", "load_state_dict") if m in cls.__dict__]
        if methods:
            out += ["Methods: " + ", ".join(f"`{m}()`" for m in methods) + ".", ""]

    out += ["## fused_lr.param_groups", "", "```python",
            signature_line("param_groups", list(inspect.signature(fused_lr.param_groups).parameters.values())),
            "```", "", markdown(inspect.getdoc(fused_lr.param_groups)), ""]

    out += ["## fused_lr.available_backends", "", "```python",
            signature_line("available_backends", []), "```", "",
            markdown(inspect.getdoc(fused_lr.available_backends)), "",
            "The backends: " + ", ".join(f"`{n}`" for n in backends.NAMES) + ". `backend=\"auto\"` takes the first "
            "available one that runs on the parameters' device, in this order:", ""]
    for device, order in backends._AUTO.items():
        out.append(f"- {device}: " + ", ".join(f"`{n}`" for n in order))
    out += ["", "A backend whose import or `load()` fails is unavailable, with the reason; `backend=\"auto\"` "
            "moves on to the next. `fused_lr.BackendUnavailable` is the exception a backend's `load()` raises "
            "to say why.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale, write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python scripts/api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
