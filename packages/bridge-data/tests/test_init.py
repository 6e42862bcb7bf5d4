import subprocess
import sys

import bridge_data


def test_every_public_name_resolves():
    for name in bridge_data.__all__:
        value = getattr(bridge_data, name)
        assert value.__name__ == name
    assert set(bridge_data.__all__) <= set(dir(bridge_data))


def test_import_is_light_and_has_no_side_effects():
    code = ("import sys, logging, bridge_data; "
            "heavy = [m for m in ('torch', 'megatron.core', 'transformers', 'datasets') if m in sys.modules]; "
            "assert not heavy, heavy; assert not logging.getLogger().handlers")
    subprocess.run([sys.executable, "-c", code], check=True)
