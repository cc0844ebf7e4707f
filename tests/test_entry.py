"""The ComfyUI entry point: the pack's root __init__.py, loaded by path as ComfyUI loads it."""
import importlib.util
import logging
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_pack(folder, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
        if str(folder) in sys.path:
            sys.path.remove(str(folder))
    return module


def test_a_failing_node_import_is_logged_with_its_cause(tmp_path, caplog):
    pack = tmp_path / "pack"
    (pack / "nodes").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "__init__.py"), pack / "__init__.py")
    (pack / "nodes" / "__init__.py").write_text("import a_package_that_is_not_installed\n")
    with caplog.at_level(logging.ERROR, logger="fastvideo_nodes"):
        module = _load_pack(pack, "fastvideo_pack_broken")
    assert module.NODE_CLASS_MAPPINGS == {}  # ComfyUI stays up, the pack offers nothing
    assert "could not be imported" in caplog.text and "requirements.txt" in caplog.text
    assert "a_package_that_is_not_installed" in caplog.text  # the cause, with its traceback


def test_the_real_pack_registers_every_node():
    module = _load_pack(ROOT, "fastvideo_pack_real")
    assert {"LoadFastVideoModel", "FastVideoSampler", "FastVideoEncodePrompt", "FastVideoDecodeVAE",
            "FastVideoSetAttentionBackend", "FastVideoParallelWorkers"} <= set(module.NODE_CLASS_MAPPINGS)
    assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(module.NODE_CLASS_MAPPINGS)


def test_production_code_never_imports_the_test_fixtures():
    """fastvideo_nodes/testing/ builds random models for tests and the demo; only the CLI's `demo`
    command may reach it (lazily), so nothing a user loads depends on test code."""
    import re
    allowed = {os.path.join("fastvideo_nodes", "cli.py")}
    offenders = []
    for top in ("fastvideo_nodes", "nodes"):
        for folder, _, names in os.walk(os.path.join(ROOT, top)):
            rel = os.path.relpath(folder, ROOT)
            if rel.startswith(os.path.join("fastvideo_nodes", "testing")):
                continue
            for name in names:
                path = os.path.join(rel, name)
                if name.endswith(".py") and path not in allowed:
                    with open(os.path.join(ROOT, path)) as f:
                        if re.search(r"^\s*(from|import)\s+(\.+|fastvideo_nodes\.)testing\b", f.read(), re.M):
                            offenders.append(path)
    assert offenders == []
