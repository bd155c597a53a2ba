"""The layout the design promises, checked on the source: model packages never reach up into
orchestration, stages stand side by side, no module imports itself round a cycle, the registry's
vocabulary has one owner, a composed model is assembled in one place, and the wings of pipeline/
import in one direction. Each rule is a function of source text or of the import graph, so each
test also feeds it a planted violation and watches it report that (a rule that cannot fail
checks nothing)."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("artifacts", "experts", "routing", "composition", "pipeline", "jobs")
MODEL_PACKAGES = ("artifacts", "experts", "routing", "composition")
STAGES = ("pipeline.stages.cluster", "pipeline.stages.experts", "pipeline.stages.compose", "pipeline.stages.evaluate")
NAMES_MODULE = "pipeline/store/names.py"
ASSEMBLER = "pipeline/store/catalog.py"  # the one assembly of a composed model from the registry
ASSEMBLY_CALLS = ("ComposedLM", "assemble", "load_composed")
# what the text and results wings may import from pipeline/: settings, errors, the registry's names, their own
WING_ALLOWED = {"pipeline.text": ("pipeline.config", "pipeline.errors", "pipeline.text"),
                "pipeline.results": ("pipeline.config", "pipeline.errors", "pipeline.results", "pipeline.store.names")}
STORE_NEVER = ("pipeline.stages", "pipeline.serve", "pipeline.results", "pipeline.cli")  # store is below them


def source_files(packages=PACKAGES) -> list[Path]:
    return [p for pkg in packages for p in sorted((REPO / pkg).rglob("*.py"))]


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str) -> set[str]:
    """Every module an import statement in the source names, at any depth (function bodies too)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def graph() -> dict[str, set[str]]:
    """moie module -> the moie modules it imports."""
    modules = {module_name(p): p for p in source_files()}
    return {name: {m for m in imports_of(path.read_text(encoding="utf-8")) if m in modules and m != name}
            for name, path in modules.items()}


# --- the rules, as functions that report violations ----------------------------------------------


def tag_literals(source: str) -> list[int]:
    """Lines of string literals (f-strings included) that begin with a tag key, "moie.<...>"."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and str(first.value).startswith("moie."):
                hits.append(node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("moie."):
            hits.append(node.lineno)
    return sorted(set(hits))


def assembly_calls(source: str) -> list[int]:
    """Lines that build a composed model themselves: a call of ComposedLM, assemble or load_composed."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name in ASSEMBLY_CALLS:
                hits.append(node.lineno)
    return hits


def wing_violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports against the wings' direction: text and results import from pipeline/ only what
    WING_ALLOWED lists (never Ray, MLflow or the store's internals); the store imports no wing above it."""
    out = []
    for module, imported in edges.items():
        for wing, allowed in WING_ALLOWED.items():
            if module == wing or module.startswith(wing + "."):
                out += [f"{module} imports {m}" for m in sorted(imported)
                        if m.split(".")[0] in ("pipeline", "ray", "mlflow", "jobs")
                        and not any(m == a or m.startswith(a + ".") for a in allowed)]
        if module.startswith("pipeline.store"):
            out += [f"{module} imports {m}" for m in sorted(imported) if m.startswith(STORE_NEVER)]
    return out


def external_imports(path: Path) -> set[str]:
    return imports_of(path.read_text(encoding="utf-8"))


# --- the rules on this repository ----------------------------------------------------------------


def test_model_packages_import_neither_orchestration_nor_ray_nor_mlflow():
    for path in source_files(MODEL_PACKAGES):
        bad = {m for m in external_imports(path) if m.split(".")[0] in ("pipeline", "jobs", "ray", "mlflow")}
        assert not bad, f"{relative(path)} imports {sorted(bad)}"


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
    for path in source_files():
        if relative(path) != ASSEMBLER:
            assert "search_model_versions" not in path.read_text(encoding="utf-8"), relative(path)


def test_no_tag_key_is_spelt_outside_the_names_module():
    found = {relative(p): tag_literals(p.read_text(encoding="utf-8"))
             for p in source_files((*PACKAGES, "bench")) if relative(p) != NAMES_MODULE}
    assert not {p: lines for p, lines in found.items() if lines}, "spell tag keys through pipeline.store.names.Tag"


def test_the_tag_literal_rule_finds_a_planted_key():
    planted = 'tags = {"moie.pipeline": run_id}\nkey = f"moie.sha256.{name}"\nok = "see moie.role in the docs"\n'
    assert tag_literals(planted) == [1, 2]


def test_no_pipeline_module_but_the_catalog_assembles_a_composed_model():
    found = {relative(p): assembly_calls(p.read_text(encoding="utf-8"))
             for p in source_files(("pipeline", "jobs")) if relative(p) != ASSEMBLER}
    assert not {p: lines for p, lines in found.items() if lines}, \
        "assemble composed models through Catalog.assemble / assemble_registered"
    assert assembly_calls((REPO / ASSEMBLER).read_text(encoding="utf-8")), "the catalog's assembly moved"


def test_the_assembly_rule_finds_a_planted_assembly():
    planted = ("composed = ComposedLM(central, experts)\n"
               "other = loader.load_composed(a, b, settings)\n"
               "settings = CompositionSettings(n_points=1)\n")
    assert assembly_calls(planted) == [1, 2]


def test_the_wings_import_in_one_direction():
    every_import = {module_name(p): external_imports(p) for p in source_files()}  # Ray and MLflow included
    assert wing_violations(every_import) == []


def test_the_wing_rule_finds_planted_imports_against_the_direction():
    planted = {"pipeline.text.corpus": {"pipeline.config", "pipeline.store.catalog"},
               "pipeline.results.metrics": {"pipeline.store.names", "mlflow"},
               "pipeline.store.catalog": {"pipeline.stages.compose", "pipeline.config"},
               "pipeline.stages.compose": {"pipeline.store.catalog", "pipeline.results.metrics"}}
    assert wing_violations(planted) == ["pipeline.text.corpus imports pipeline.store.catalog",
                                        "pipeline.results.metrics imports mlflow",
                                        "pipeline.store.catalog imports pipeline.stages.compose"]


def test_model_packages_export_their_public_classes():
    from composition import ComposedLM, CompositionSettings, load_composed
    from experts import GPT, HourglassConfig, HourglassLM, train
    from routing import ClusterRouter, balanced_kmeans

    config = HourglassConfig(block_size=64, group_len=16, latents=[8, 2], widths=[16, 24, 32], n_head=2)
    assert isinstance(HourglassLM(config), HourglassLM)
    assert all(callable(x) for x in (GPT, train, ClusterRouter, balanced_kmeans, ComposedLM, load_composed))
    assert CompositionSettings(n_points=1, routing="topk", k=1, threshold=0.5).pool == "token"


def test_a_shard_task_reads_and_tokenises_without_loading_torch_or_mlflow(tmp_path):
    """The cluster and experts stages run a task per corpus shard; each Ray worker of theirs
    stays small only if reading a shard (a streamed `datasets` file) and writing its tokens
    import neither torch (~150 MB a worker) nor MLflow."""
    import json
    import subprocess
    import sys

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"words of row {i}", "work": str(i)}) + "\n"
                                              for i in range(5)))
    script = f"""
import sys
import pipeline
from pipeline.config import CorpusConfig
from pipeline.stages.shards import scan_shard, shard_tokens
from pipeline.text.corpus import corpus_shards, text_sha256
corpus = CorpusConfig(source="files", files=[{str(tmp_path / "c.jsonl")!r}])
(shard,) = corpus_shards(corpus)
assert len(scan_shard(shard, corpus).keys) == 5
import pyarrow as pa
docs = pa.table({{"doc_id": ["c.jsonl:0"], "cluster": [0], "split": ["train"],
                 "text_sha256": [text_sha256("words of row 0")]}})
assert shard_tokens(shard, 0, corpus, docs, {str(tmp_path / "out")!r})["found"] == 1
print(sorted(m for m in ("torch", "mlflow") if m in sys.modules))
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "USE_TORCH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
