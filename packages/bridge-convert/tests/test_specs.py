"""The one Transformer Engine probe: a broken install reads as absent, with the reason."""

import builtins

from bridge_convert import specs


def test_broken_transformer_engine_reads_as_absent_with_its_error(monkeypatch):
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.split(".")[0] == "transformer_engine":
            raise OSError("libcudnn.so.9: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    specs.transformer_engine_status.cache_clear()
    try:
        assert specs.transformer_engine_status() == (False, "OSError: libcudnn.so.9: cannot open shared object file")
        assert not specs.te_available()
    finally:
        specs.transformer_engine_status.cache_clear()
