"""``import bridge_train`` / ``bridge_train.config`` stay light: megatron-core is imported only when used."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("statement", ["import bridge_train.config", "import bridge_train",
                                       "from bridge_train.config import TrainConfig, ConfigError, LoggerConfig"])
def test_import_does_not_pull_in_megatron(statement):
    code = f"import sys; {statement}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"{statement!r} imported megatron-core: {done.stdout[:500]}"


def test_every_lazy_export_resolves():
    import bridge_train
    import bridge_train.config

    for module in (bridge_train, bridge_train.config):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
        assert set(module.__all__) <= set(dir(module))
        with pytest.raises(AttributeError, match="no attribute 'ConfigContainr'"):
            module.ConfigContainr  # noqa: B018
    assert bridge_train.ConfigContainer is bridge_train.config.ConfigContainer


def test_importing_the_entry_points_prints_no_known_megatron_warning():
    """``from bridge_train import pretrain`` imports megatron-core; its import-time notices (TE / Apex fallbacks,
    CUDA_HOME, escape sequences) are hidden like bridge_convert's, and shown with BRIDGE_SHOW_WARNINGS=1."""
    code = "from bridge_train import pretrain, gpt_forward_step; print(pretrain.__name__)"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("BRIDGE_SHOW_WARNINGS", "PYTHONWARNINGS")}
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "pretrain", quiet.stderr[-2000:]
    assert "Transformer Engine and Apex are not installed" not in quiet.stderr, quiet.stderr[-2000:]
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**env, "BRIDGE_SHOW_WARNINGS": "1"})
    import importlib.util

    if not (importlib.util.find_spec("transformer_engine") or importlib.util.find_spec("apex")):  # the notice's cause
        assert "Transformer Engine and Apex are not installed" in shown.stderr
