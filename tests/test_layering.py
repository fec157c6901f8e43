"""The packages import one way, lowest layer first; read from the sources, function-level imports included."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each package may import only from the layers before its own.
LAYERS = (
    ("osnet_base",),  # errors, the serving contract, the tritonserver process
    ("kernels", "reid"),  # fused ops; ReID data layout and metrics
    ("engine_builder",),
    ("client",),
    ("loadtest",),
    ("deploy",),  # the nginx balancer, stand-in hosts, Kubernetes manifests
    ("demo", "benchmarks"),
)
LAYER_OF = {package: index for index, layer in enumerate(LAYERS) for package in layer}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def package_edges() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) -> the files that make the edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for package in LAYER_OF:
        for path in sorted((ROOT / package).rglob("*.py")):
            for module in imported_modules(path):
                target = module.split(".")[0]
                if target in LAYER_OF and target != package:
                    edges.setdefault((package, target), []).append(str(path.relative_to(ROOT)))
    return edges


def test_every_top_level_package_is_in_a_layer():
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert packages == set(LAYER_OF)


def test_no_package_imports_its_own_or_a_higher_layer():
    upward = {edge: files for edge, files in package_edges().items() if LAYER_OF[edge[1]] >= LAYER_OF[edge[0]]}
    assert not upward, "imports against the layering: " + "; ".join(f"{a} -> {b} in {files}" for (a, b), files in upward.items())


def test_no_two_way_edges():
    edges = package_edges()
    two_way = sorted({tuple(sorted(edge)) for edge in edges if edge[::-1] in edges})
    assert not two_way, f"packages importing each other: {two_way}"


def test_the_base_is_light():
    # Every process reads the base, the load generator's and the python-backend stubs' included.
    heavy = {"torch", "onnx", "onnxruntime", "openvino", "cupy", "tensorrt"}
    for path in sorted((ROOT / "osnet_base").rglob("*.py")):
        used = {module.split(".")[0] for module in imported_modules(path)}
        assert not used & heavy, f"{path.name} imports {sorted(used & heavy)}"
    assert {module.split(".")[0] for module in imported_modules(ROOT / "osnet_base" / "contract.py")} <= {"__future__"}


def test_python_backend_models_import_only_what_is_copied_beside_them():
    from engine_builder.triton_repository import PYTHON_HELPER_MODULES

    ours = set(LAYER_OF) - {"kernels"}  # the TensorRT JIT model runs in the project's venv, with the plugins
    copied = {path.stem for path in PYTHON_HELPER_MODULES}
    for path in [*sorted((ROOT / "triton_repo").glob("*.py")), *PYTHON_HELPER_MODULES]:
        used = {module.split(".")[0] for module in imported_modules(path)}
        assert not used & ours, f"{path.name} imports {sorted(used & ours)}"
        if path in PYTHON_HELPER_MODULES:  # the stub finds nothing of ours but what lies beside model.py
            assert not used & (ours | {"kernels"}), f"{path.name} imports {sorted(used & (ours | {'kernels'}))}"
    assert {"contract", "batched_responses", "cpu_sessions"} <= copied
