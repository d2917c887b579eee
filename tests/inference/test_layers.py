"""The package's structure, read from its source (imports parsed, nothing imported):

- the inference layer reaches the backends only through the ops (no ``_triton*``, ``_winograd``,
  ``_nnpack``, ``_onednn``, ``_cudnn``, ``_extension`` module imported under fpn_fast/inference);
- imports point one way: nothing under fpn_fast/ops imports a module above it, and no two
  modules import each other, directly or around a longer cycle;
- the build path of a plan never synchronises the device or empties the allocator's cache
  (either breaks a CUDA graph another thread is capturing);
- no library file is over 400 lines.
"""
import ast
from pathlib import Path
from typing import Dict, Set

PACKAGE = Path(__file__).resolve().parents[2] / "fpn_fast"
BACKEND_PREFIXES = ("_triton", "_winograd", "_nnpack", "_onednn", "_cudnn", "_extension")
COMPILED = "fpn_fast._C"  # the compiled extension (csrc/), beneath every Python module


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / Path(*name.split(".")) / "__init__.py").exists()


def _exists(name: str) -> bool:
    if name == COMPILED:
        return True
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: Path) -> Set[str]:
    """The fpn_fast modules a file imports (at any depth: function-level imports included);
    ``from package import name`` counts as importing the submodule when ``name`` is one."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("fpn_fast"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fpn_fast"):
                continue
            submodules = [f"{target}.{alias.name}" for alias in node.names if _exists(f"{target}.{alias.name}")]
            found.update(submodules or [target])
            if len(submodules) < len(node.names):
                found.add(target)
    return {name for name in found if _exists(name)} - {module}


def _graph() -> Dict[str, Set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def test_the_inference_layer_imports_no_backend():
    graph = _graph()
    offenders = {module: sorted(name for name in imported if name.rpartition(".")[2].startswith(BACKEND_PREFIXES))
                 for module, imported in graph.items() if module.startswith("fpn_fast.inference")}
    assert {module: names for module, names in offenders.items() if names} == {}


def test_the_ops_import_nothing_above_them():
    graph = _graph()
    upward = {module: sorted(name for name in imported if not name.startswith("fpn_fast.ops") and name != COMPILED)
              for module, imported in graph.items() if module.startswith("fpn_fast.ops")}
    assert {module: names for module, names in upward.items() if names} == {}
    export = {name for module, imported in graph.items() if module.startswith("fpn_fast.export") for name in imported}
    assert all(name.startswith(("fpn_fast.ops", "fpn_fast.export")) for name in export), export


def test_no_import_cycle():
    """Package edges (a module importing its own package's ``__init__``) are left out: Python
    runs the package first anyway."""
    graph = _graph()
    edges = {module: {name for name in imported
                      if not (_is_package(name) and module.startswith(name + "."))} for module, imported in graph.items()}
    state: Dict[str, int] = {}
    cycles = []

    def visit(module, path):
        state[module] = 1
        for name in sorted(edges.get(module, ())):
            if state.get(name) == 1:
                cycles.append(path[path.index(name):] + [name])
            elif name not in state:
                visit(name, path + [name])
        state[module] = 2
    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node.func, node


def test_the_build_path_never_synchronises_the_device():
    """torch.cuda.synchronize, torch.cuda.empty_cache and .item() are device-wide or stream
    syncs on the caller's stream; the engine, its captures and the measuring policy wait on
    their own streams and events only."""
    build_path = [PACKAGE / "inference" / name for name in ("engine.py", "cuda_graphs.py", "plan.py")]
    build_path += [PACKAGE / "ops" / "measure.py", PACKAGE / "ops" / "conv" / "_cudnn.py"]
    found = []
    for path in build_path:
        for func, node in _calls(path):
            owner = ast.unparse(func.value)
            if (func.attr in ("synchronize", "empty_cache") and owner in ("torch.cuda", "cuda")) or func.attr == "item":
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_no_library_file_is_over_400_lines():
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}
