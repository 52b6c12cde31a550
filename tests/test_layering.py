"""The floor plan holds: dependencies run one way, and environments stay Ray-free.

    agenttuning/  ground: config schema, chat format and masks, data sources, model loading,
                  console, CLI plumbing — imports neither jobs nor Serve apps
    serve/envs/   environments — stand on the ground, never import Ray or the Serve apps
    serve/        Serve apps — stand on both, never import the jobs
    pipelines/    jobs — use everything

Every import statement counts, at module level or inside a function. Project modules are imported
at module level; a function-local project import is allowed only where listed below with its reason.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PROJECT = ("agenttuning", "pipelines", "serve")

# (file, imported module) -> why the import is local. Breaking an import cycle is not a reason.
LOCAL_IMPORTS_ALLOWED = {
}


def _imports(path: pathlib.Path):
    """(module, lineno, is_function_local) of every absolute import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, id(node) in local
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno, id(node) in local


def _files(folder: str):
    return sorted((REPO / folder).rglob("*.py"))


def _violations(folder: str, forbidden, exclude=()):
    out = []
    for f in _files(folder):
        rel = f.relative_to(REPO).as_posix()
        if any(rel.startswith(e) for e in exclude):
            continue
        for mod, line, _ in _imports(f):
            if any(mod == b or mod.startswith(b + ".") for b in forbidden):
                out.append(f"{rel}:{line} imports {mod}")
    return out


def test_ground_imports_neither_jobs_nor_serve_apps():
    assert _violations("agenttuning", ("pipelines", "serve")) == []


def test_serve_apps_never_import_the_jobs():
    assert _violations("serve", ("pipelines",)) == []


def test_environments_are_ray_free_and_stand_on_the_ground_only():
    bad = _violations("serve/envs", ("ray", "pipelines", "serve.app", "serve.llm", "serve.eft", "serve.rollout",
                                     "serve.env_server", "serve.lifecycle", "serve.openai_api"))
    assert bad == []


@pytest.mark.parametrize("folder", PROJECT)
def test_no_function_local_project_imports(folder):
    """Project modules import each other at module level (lazy heavy third-party imports are fine)."""
    local = []
    for f in _files(folder):
        rel = f.relative_to(REPO).as_posix()
        for mod, line, is_local in _imports(f):
            if is_local and mod.split(".")[0] in PROJECT and (rel, mod) not in LOCAL_IMPORTS_ALLOWED:
                local.append(f"{rel}:{line} imports {mod} inside a function")
    assert local == []


def test_the_check_catches_a_violation(tmp_path, monkeypatch):
    """A planted upward import in the ground layer is reported (the test can fail)."""
    ground = tmp_path / "agenttuning"
    ground.mkdir()
    (ground / "x.py").write_text("def f():\n    from pipelines import train\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert _violations("agenttuning", ("pipelines",)) == ["agenttuning/x.py:2 imports pipelines"]
