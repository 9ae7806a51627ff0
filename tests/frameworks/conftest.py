"""Each test module here needs one framework; where it does not import, the module is skipped
whole, with one reason that says how to get it (docs/frameworks.md)."""

import importlib
import importlib.util

import pytest

REQUIRES = {
    "test_lightning.py": ("lightning", "pip install 'fused_lr[lightning]', or `make test-lightning`"),
    "test_timm.py": ("timm", "`make test-timm` runs it in .venv-timm, with the CUDA torch that PyPI's torchvision "
                             "needs"),
}


def _missing(module: str) -> str | None:
    """Why ``module`` cannot be used here, or None. timm can be installed and still fail to
    import (torchvision built for another torch), so the check imports it."""
    if importlib.util.find_spec(module) is None:
        return "is not installed"
    try:
        importlib.import_module(module)
    except Exception as e:  # any failure to import means the tests cannot run
        return f"does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


class _Skipped(pytest.Module):
    def collect(self):
        pytest.skip(self.reason)


def pytest_pycollect_makemodule(module_path, parent):
    if module_path.name not in REQUIRES:
        return None
    module, how = REQUIRES[module_path.name]
    why = _missing(module)
    if why is None:
        return None
    skipped = _Skipped.from_parent(parent, path=module_path)
    skipped.reason = f"{module_path.name} not run: {module} {why}; {how}"
    return skipped
