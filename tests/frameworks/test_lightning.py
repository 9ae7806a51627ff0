"""FusedSGD under PyTorch Lightning's Trainer (docs/frameworks.md).

The Trainer runs the same operations as a plain loop, in the same order (forward, zero_grad,
backward, step, scheduler step), on the CPU in float64, so a Trainer run and the plain loop
agree bit for bit, and so do a resumed run and an uninterrupted one. Where one side clips
with ``torch.nn.utils.clip_grad_norm_`` (or ``clip_grad_value_``) and the other inside
FusedSGD's step, the two agree to 1e-10 relative: only the clip coefficient's reduction order
differs (~1e-15 per step), the tolerance of tests/test_torch_schedulers.py.
"""

import logging
from importlib.metadata import distribution

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from cases import batches, make_model, max_rel_diff, split_groups
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import lr_scheduler as lrs

from fused_lr import FusedAdamW, FusedSGD, schedules
from fused_lr.core.optimizer import FusedOptimizer
from fused_lr.integrations.lightning import FusedClipCheck

EPOCH, EPOCHS = 4, 3  # batches per epoch, epochs: 12 steps
STEPS = EPOCH * EPOCHS
DATA = list(batches(EPOCH))  # the same batches, in the same order, every epoch
CFG = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
MAX_NORM = 0.05  # below every step's gradient norm here (asserted), so every step clips
CLIP_VALUE = 0.01
SCHEDULE = schedules.Warmup(3, schedules.Cosine(STEPS - 3, min_factor=0.05), start_factor=0.1)

# Lightning reports its set-up (devices, precision) at INFO on every fit
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
# Lightning 2.6's own use of a torch.utils._pytree name that newer torch deprecates
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated")


def fused(model, schedule=None, **clip):
    decay, no_decay = split_groups(model)
    second = dict(params=no_decay, lr=0.05, weight_decay=0.0, schedule=schedules.Exponential(0.9) if schedule else None)
    return FusedSGD([dict(params=decay), second], schedule=schedule, **clip, **CFG)


def torch_sgd(model):
    decay, no_decay = split_groups(model)
    return torch.optim.SGD([dict(params=decay), dict(params=no_decay, lr=0.05, weight_decay=0.0)],
                           foreach=False, **CFG)


def one_cycle(opt):
    return lrs.OneCycleLR(opt, max_lr=[0.2, 0.1], total_steps=STEPS, cycle_momentum=True,
                          base_momentum=0.8, max_momentum=0.95)


# name -> (optimizer factory, scheduler factory stepped after every batch, or None)
SETUPS = {
    "fused-schedule": (lambda m: fused(m, SCHEDULE, max_grad_norm=MAX_NORM), None),
    "torch-scheduler-per-batch": (lambda m: fused(m, max_grad_norm=MAX_NORM), one_cycle),
}


class Batches:
    """DATA as a resumable loader: Lightning saves its state_dict in a checkpoint and, on
    resume, continues mid-epoch with the next unseen batch (a plain DataLoader restarts the epoch)."""

    def __init__(self, dtype=torch.float64):
        self.items = [(x.to(dtype), y) for x, y in DATA]
        self.start = self.taken = 0

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, len(self.items)):
            self.taken = i + 1
            yield self.items[i]

    def state_dict(self):
        return {"taken": self.taken}

    def load_state_dict(self, state):
        self.start = state["taken"] % len(self.items)  # all taken: the next epoch starts afresh


def lr_now(opt) -> list[float]:
    """Each group's lr for the step about to run (the schedule's factor included)."""
    return opt.current_lr() if isinstance(opt, FusedOptimizer) else [g["lr"] for g in opt.param_groups]


class Classifier(L.LightningModule):
    def __init__(self, make_opt, make_sched=None):
        super().__init__()
        self.net = make_model()
        self.make_opt, self.make_sched = make_opt, make_sched
        self.lrs, self.norms, self.grad_max = [], [], []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = self.make_opt(self.net)
        if self.make_sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.make_sched(opt), "interval": "step"}}

    def on_before_optimizer_step(self, optimizer):
        # Lightning calls this hook after backward and before its own clipping
        self.lrs.append(lr_now(optimizer))
        grads = [p.grad for p in self.parameters()]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.grad_max.append(max(float(g.abs().max()) for g in grads))


def trainer(**kw) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, precision="64-true", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**settings, **kw})


def fit(module, epochs=EPOCHS, ckpt_path=None, data=None, **kw):
    t = trainer(max_epochs=epochs, **kw)
    t.fit(module, train_dataloaders=Batches() if data is None else data, ckpt_path=ckpt_path,
          weights_only=True if ckpt_path else None)
    return t


def plain_loop(make_opt, make_sched=None):
    model = make_model()
    opt = make_opt(model)
    sched = make_sched(opt) if make_sched else None
    history = []
    for _ in range(EPOCHS):
        for x, y in DATA:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            history.append(lr_now(opt))
            opt.step()
            if sched is not None:
                sched.step()
    return model, opt, history


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    """Parameters and BatchNorm statistics equal bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same(a, b, where="state_dict"):
    """Nested checkpoint contents equal: tensors bit for bit, everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_optimizer_state(a: FusedSGD, b: FusedSGD):
    """Momentum buffers, step counts, group clocks and hyper-parameters: the whole checkpoint."""
    assert_same(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("setup", list(SETUPS))
def test_trainer_equals_plain_loop(setup):
    make_opt, make_sched = SETUPS[setup]
    module = Classifier(make_opt, make_sched)
    t = fit(module)
    model, opt, history = plain_loop(make_opt, make_sched)
    assert t.global_step == STEPS
    assert module.lrs == history
    assert len({h[0] for h in history}) > STEPS // 2  # the lr really moves, every step or nearly
    assert_same_state(module.net, model)
    assert_same_optimizer_state(t.optimizers[0], opt)


# the resumed run saves beside the checkpoints it resumes from, as a restarted job does
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("every", [EPOCH, EPOCH + 2], ids=["at-epoch-end", "mid-epoch"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_resume_equals_uninterrupted(setup, every, tmp_path):
    """An uninterrupted run writes a checkpoint every ``every`` steps (ModelCheckpoint); a fresh
    module and Trainer, which rebuild the optimizer (and scheduler) in configure_optimizers,
    resume from the first one (weights_only=True) and finish exactly as the run did."""
    make_opt, make_sched = SETUPS[setup]

    def saving():
        save = L.callbacks.ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=every, save_top_k=-1)
        return dict(enable_checkpointing=True, callbacks=[save])

    whole = Classifier(make_opt, make_sched)
    t_whole = fit(whole, **saving())
    rest = Classifier(make_opt, make_sched)
    t_rest = fit(rest, ckpt_path=tmp_path / f"step={every}.ckpt", **saving())

    assert t_rest.global_step == STEPS
    assert rest.lrs == whole.lrs[every:]
    assert_same_state(rest.net, whole.net)
    assert_same_optimizer_state(t_rest.optimizers[0], t_whole.optimizers[0])


@pytest.mark.parametrize("algorithm,threshold,fused_kw", [("norm", MAX_NORM, "max_grad_norm"),
                                                          ("value", CLIP_VALUE, "clip_value")])
def test_lightning_clipping_equals_fused_clipping(algorithm, threshold, fused_kw):
    """Trainer(gradient_clip_val) with FusedSGD(no clipping) is torch.optim.SGD's behaviour under
    the same Trainer, and FusedSGD's own clipping (no Trainer clipping) gives the same result."""
    clip = dict(gradient_clip_val=threshold, gradient_clip_algorithm=algorithm)
    with_torch = Classifier(torch_sgd)
    fit(with_torch, **clip)
    by_lightning = Classifier(fused)
    fit(by_lightning, **clip)
    by_fused = Classifier(lambda m: fused(m, **{fused_kw: threshold}))
    fit(by_fused)

    assert max_rel_diff(with_torch.net, by_lightning.net) <= 1e-10
    assert max_rel_diff(by_lightning.net, by_fused.net) <= 1e-10
    # the clipping acted on every step
    unclipped = by_fused.norms if algorithm == "norm" else by_fused.grad_max
    assert min(unclipped) > threshold


@pytest.mark.parametrize("algorithm,fused_kw,make", [
    ("norm", "max_grad_norm", fused), ("value", "clip_value", fused), ("norm", "clip_value", fused),
    ("norm", "max_grad_norm", lambda m, **clip: FusedAdamW(m.parameters(), lr=1e-3, **clip)),
], ids=["norm-norm", "value-value", "norm-value", "adamw"])
def test_clipping_twice_is_refused(algorithm, fused_kw, make):
    module = Classifier(lambda m: make(m, **{fused_kw: 1.0}))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(MisconfigurationException, match=rf"{fused_kw}=1.0\) clips them again"):
        fit(module, gradient_clip_val=0.5, gradient_clip_algorithm=algorithm, callbacks=[FusedClipCheck()])
    assert module.lrs == []  # refused before the first step
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_lightning_clipping_under_a_grad_scaler_is_refused():
    """Under a GradScaler FusedSGD unscales inside its step, so Lightning cannot clip before it;
    the check says so before the first step, and FusedSGD's own clipping trains."""

    def scaled(**kw):  # precision="16-mixed" with the GradScaler that CUDA would get, on the CPU
        return dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))], precision=None,
                    **kw)

    module = Classifier(fused)
    module.net.float()
    with pytest.raises(MisconfigurationException, match="under a GradScaler FusedSGD unscales"):
        fit(module, data=Batches(torch.float32), **scaled(gradient_clip_val=MAX_NORM))
    assert module.lrs == []
    own = Classifier(lambda m: fused(m, max_grad_norm=MAX_NORM))
    own.net.float()
    fit(own, epochs=1, data=Batches(torch.float32), **scaled())
    assert len(own.lrs) == EPOCH and all(torch.isfinite(p).all() for p in own.parameters())


def test_overridden_clipping_hook_only_warns():
    """A module that clips its own way in configure_gradient_clipping decides what
    gradient_clip_val means there: the check warns and training goes on."""

    class OwnClipping(Classifier):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            pass  # this module leaves all clipping to FusedSGD

    make_opt = lambda m: fused(m, max_grad_norm=MAX_NORM)
    module = OwnClipping(make_opt)
    with pytest.warns(UserWarning, match="configure_gradient_clipping is overridden"):
        fit(module, epochs=1, gradient_clip_val=MAX_NORM / 2, callbacks=[FusedClipCheck()])
    alone = Classifier(make_opt)
    fit(alone, epochs=1)
    assert len(module.lrs) == EPOCH
    assert_same_state(module.net, alone.net)  # the hook's choice (no clipping by Lightning) held


def test_every_trainer_carries_the_check():
    """The package's entry point adds FusedClipCheck to a Trainer nobody gave it to."""
    points = [e for e in distribution("fused_lr").entry_points if e.group == "lightning.pytorch.callbacks_factory"]
    assert [e.value for e in points] == ["fused_lr.integrations.lightning:callbacks"], (
        "fused_lr's installed metadata lacks its Lightning entry point: reinstall fused_lr (pip install -e .)")
    assert any(isinstance(cb, FusedClipCheck) for cb in trainer().callbacks)
    module = Classifier(lambda m: fused(m, max_grad_norm=1.0))
    with pytest.raises(MisconfigurationException, match="clips them again"):
        fit(module, gradient_clip_val=0.5)
