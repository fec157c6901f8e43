"""The one place that chooses the TensorRT module: what it picks here and the differences it names."""
from __future__ import annotations

import pytest

from kernels import tensorrt_library
from kernels.tensorrt_library import load_tensorrt, tensorrt_unavailable_reason

pytestmark = pytest.mark.tensorrt
if tensorrt_unavailable_reason() is not None:
    pytest.skip(tensorrt_unavailable_reason(), allow_module_level=True)


def test_the_library_names_how_it_differs():
    library = load_tensorrt()
    assert library.network_flags() == (0 if not hasattr(library.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
                                       else 1 << int(library.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    if library.name == "TensorRT-RTX":
        assert not (library.quick_plugins or library.needs_gpu_to_build or library.served_by_triton)
        capabilities = tensorrt_library.rtx_compute_capabilities(library.module)
        assert {"7.5", "8.6", "8.9", "12.0"} <= set(capabilities) and "9.0" not in capabilities
        assert "9.0" not in library.runs_on
    else:
        assert library.name == "TensorRT" and library.needs_gpu_to_build and library.served_by_triton


@pytest.mark.skipif(load_tensorrt().name != "TensorRT-RTX", reason="the parser-library link is a TensorRT-RTX wheel matter")
def test_rtx_parser_library_is_linked_or_the_reason_says_how(monkeypatch, tmp_path):
    library = load_tensorrt()
    assert library.plugin_layers_unavailable_reason() is None  # make links it when it installs the wheels
    assert (tensorrt_library.rtx_library_dir() / tensorrt_library.RTX_PARSER_LOADS).resolve().name == tensorrt_library.RTX_CORE_LIBRARY
    monkeypatch.setattr(tensorrt_library, "rtx_library_dir", lambda: tmp_path)
    reason = library.plugin_layers_unavailable_reason()
    assert reason is not None and "--link-rtx-parser-library" in reason and "aborts the process" in reason
