"""The layout the design promises, checked on the source: model packages never reach up into
orchestration, stages stand side by side, and no module imports itself round a cycle."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("artifacts", "experts", "routing", "composition", "pipeline", "jobs")
MODEL_PACKAGES = ("artifacts", "experts", "routing", "composition")
STAGES = ("pipeline.stages.cluster", "pipeline.stages.experts", "pipeline.stages.compose", "pipeline.stages.evaluate")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module an import statement in the file names, at any depth (function bodies too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def graph() -> dict[str, set[str]]:
    """moie module -> the moie modules it imports."""
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_model_packages_import_neither_orchestration_nor_ray_nor_mlflow():
    for path in (p for pkg in MODEL_PACKAGES for p in (REPO / pkg).rglob("*.py")):
        bad = {m for m in imports_of(path) if m.split(".")[0] in ("pipeline", "jobs", "ray", "mlflow")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_module_imports_another_stage_module(stage):
    imported = graph()[stage]
    assert not imported & (set(STAGES) - {stage}), f"{stage} imports {sorted(imported & set(STAGES))}"


def test_the_module_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_every_registry_query_is_built_in_the_catalog():
    for path in (p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")):
        if path.relative_to(REPO).as_posix() != "pipeline/catalog.py":
            assert "search_model_versions" not in path.read_text(encoding="utf-8"), path.relative_to(REPO)


def test_model_packages_export_their_public_classes():
    from composition import ComposedLM, CompositionSettings, load_composed
    from experts import GPT, HourglassConfig, HourglassLM, train
    from routing import ClusterRouter, balanced_kmeans

    config = HourglassConfig(block_size=64, group_len=16, latents=[8, 2], widths=[16, 24, 32], n_head=2)
    assert isinstance(HourglassLM(config), HourglassLM)
    assert all(callable(x) for x in (GPT, train, ClusterRouter, balanced_kmeans, ComposedLM, load_composed))
    assert CompositionSettings(n_points=1, routing="topk", k=1, threshold=0.5).pool == "token"
