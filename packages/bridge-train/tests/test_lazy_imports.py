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
