"""The package's layers only look down (vLLM v1's shape): a module imports from its own layer or
from those below it, never from one above. Read from the source with ``ast``, so a lazy import
inside a function counts too."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vllm_lite"

# the first name under vllm_lite -> its layer, higher above; any other top-level module
# (config, sampling_params, default_model, triton_compat, ...) is a utility, layer 0
LAYERS = {
    "entrypoints": 4,  # LLM, CLI, server, benchmarks
    "engine": 3,  # scheduler, block manager, sequences, the engine loop
    "worker": 2,  # model runner, sampler, tensor-parallel workers
    "models": 1,  # the model: its architectures, layers, attention backends
    "layers": 1,
    "attention": 1,
    "parallel_state": 1,
}
LAYER_NAMES = {4: "entrypoints", 3: "engine", 2: "worker", 1: "model", 0: "utilities"}
FACADE = 4  # vllm_lite/__init__.py re-exports the public API (LLM, SamplingParams, ...)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts == ["vllm_lite"]:
        return FACADE
    return LAYERS.get(parts[1], 0)


def imported_modules(module: str, source: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every vllm_lite module that ``source`` imports; ``from vllm_lite
    import x`` names the submodule x where there is one."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")[: len(module.split(".")) - (not is_package)]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                path = PACKAGE.parent / sub.replace(".", "/")
                is_module = path.with_suffix(".py").exists() or path.is_dir()
                found.append((node.lineno, sub if is_module else base))
    return [
        (line, m)
        for line, m in dict.fromkeys(found)
        if m == "vllm_lite" or m.startswith("vllm_lite.")
    ]


def upward_imports(module: str, source: str, is_package: bool = False) -> list[str]:
    own = layer_of(module)
    return [
        f"{module}:{line} ({LAYER_NAMES[own]}) imports {target} ({LAYER_NAMES[layer_of(target)]})"
        for line, target in imported_modules(module, source, is_package)
        if layer_of(target) > own
    ]


def package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        yield ".".join(parts[:-1] if is_package else parts), path, is_package


def test_no_module_imports_from_a_layer_above_it():
    found = [
        line
        for module, path, is_package in package_modules()
        for line in upward_imports(module, path.read_text(), is_package)
    ]
    assert found == []


def test_an_upward_import_is_found_even_inside_a_function():
    source = (
        "from vllm_lite.config import EngineConfig\n"
        "def run():\n"
        "    from vllm_lite.engine import sequence\n"
    )
    assert upward_imports("vllm_lite.worker.sampler", source) == [
        "vllm_lite.worker.sampler:3 (worker) imports vllm_lite.engine.sequence (engine)"
    ]


def test_a_relative_import_resolves_to_its_layer():
    source = "from ..engine.scheduler import Scheduler\n"
    assert upward_imports("vllm_lite.worker.model_runner", source) == [
        "vllm_lite.worker.model_runner:1 (worker) imports vllm_lite.engine.scheduler (engine)"
    ]
