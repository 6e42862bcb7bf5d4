"""Known-harmless megatron-core / torch warnings are hidden by the entry points, narrowly; the switch shows them."""

import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from bridge_convert.runtime import warnings_filter

# What a user saw in every script before (the text as megatron-core and torch print it).
KNOWN = ["Transformer Engine and Apex are not installed", "full scope is deprecated",
         "is experimental and still under active development", "MCore's async save is deprecated",
         "No CUDA runtime is found", "The argument order of load has been changed",
         "Unable to save", "invalid escape sequence", "full_param_layout not provided",
         "is not a leaf Tensor is being accessed", "absl.logging is not installed"]


@pytest.fixture
def fresh_filter(monkeypatch):
    """silence_known_warnings() as in a new process, inside a warnings context restored afterwards."""
    monkeypatch.setattr(warnings_filter, "_installed", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield seen


def _warn(message: str, module: str, category=UserWarning) -> None:
    warnings.warn_explicit(message, category, f"/site-packages/{module.replace('.', '/')}.py", 7, module=module)


def test_known_warnings_are_hidden_by_message_and_module_only(fresh_filter):
    warnings_filter.silence_known_warnings()
    _warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
          "megatron.core.optimizer")
    _warn("full scope is deprecated. Use empty cuda_graph_modules", "megatron.core.transformer.transformer_config")
    _warn("absl.logging is not installed. Using logging.getLogger(__name__) instead. Please install absl.logging "
          "with `pip install absl-py` to use absl.logging.", "megatron.core.hyper_comm_grid")  # without absl-py
    assert fresh_filter == []
    _warn("Transformer Engine and Apex are not installed. Falling back", "my_project.optim")  # another module
    _warn("something new in megatron", "megatron.core.optimizer")  # another message, same module
    _warn("Transformer Engine and Apex are not installed.", "megatron.core.optimizer", DeprecationWarning)
    assert [str(w.message) for w in fresh_filter] == [
        "Transformer Engine and Apex are not installed. Falling back", "something new in megatron",
        "Transformer Engine and Apex are not installed."]


def test_known_log_records_are_dropped_and_others_kept(fresh_filter, caplog):
    warnings_filter.silence_known_warnings()
    log = logging.getLogger("megatron.core.datasets.gpt_dataset")
    with caplog.at_level(logging.WARNING):
        log.warning("Unable to save MockGPTDataset indexes because path_to_cache is None")
        log.warning("Some other dataset problem")
        logging.getLogger("my_project").warning("Unable to save MockGPTDataset indexes because path_to_cache is None")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("megatron.core.datasets.gpt_dataset", "Some other dataset problem"),
        ("my_project", "Unable to save MockGPTDataset indexes because path_to_cache is None")]


def test_the_switch_shows_them(fresh_filter, monkeypatch):
    monkeypatch.setenv("BRIDGE_SHOW_WARNINGS", "1")
    warnings_filter.silence_known_warnings()
    _warn("Transformer Engine and Apex are not installed. Falling back", "megatron.core.optimizer")
    assert len(fresh_filter) == 1


_USER_SCRIPT = textwrap.dedent("""
    import sys, warnings
    from bridge_convert import AutoBridge

    if __name__ == "__main__":
        hf, out, convert = sys.argv[1:4]
        if convert == "yes":
            AutoBridge.import_ckpt(hf, out + "/mcore")
            AutoBridge.export_ckpt(out + "/mcore", out + "/hf")
        # The conversion above needs no megatron-core (offline); a user's own use of it brings its import-time
        # notices (the TE / Apex fallbacks), which the filter installed by bridge_convert hides too.
        import megatron.core.optimizer  # noqa: F401
        warnings.warn("an unrelated warning of the user's own")
""")


@pytest.mark.parametrize("show", [False, True], ids=["default", "BRIDGE_SHOW_WARNINGS=1"])
def test_a_user_script_prints_none_of_them(show, hf_checkpoints, tmp_path):
    script = tmp_path / "convert.py"
    script.write_text(_USER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("BRIDGE_SHOW_WARNINGS", "PYTHONWARNINGS")}
    if show:
        env["BRIDGE_SHOW_WARNINGS"] = "1"
    # The import-time notices are the ones to show with the switch; the conversion runs in the default case only.
    argv = [sys.executable, str(script), hf_checkpoints["llama"], str(tmp_path), "no" if show else "yes"]
    run = subprocess.run(argv, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "an unrelated warning of the user's own" in run.stderr
    shown = [k for k in KNOWN if k in run.stderr]
    if show:
        assert "Transformer Engine and Apex are not installed" in shown
    else:
        assert shown == [], run.stderr
