"""The shape of the code a newcomer reads: small modules and functions, no import circle, no private reach-ins."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the import package it installs as (pyproject.toml's package-dir).
PACKAGES = {
    "mixem": "mixem",
    "kernels": "mixem.kernels",
    "export": "mixem.export",
    "cli": "mixem.cli",
    "bench": "mixem.bench",
}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, nested ones included."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this module
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def _edges(name: str, path: Path) -> set[str]:
    edges = set()
    for mod, names, _ in _imports(name, path):
        subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]  # `from pkg import submodule`
        edges.update(subs)
        if mod in MODULES and len(subs) < len(names) or (mod in MODULES and not names):
            edges.add(mod)
    edges.discard(name)
    return edges


def test_the_package_is_what_the_test_reads():
    assert {
        "mixem.config",
        "mixem.methods",
        "mixem.engines",
        "mixem.kmeans",
        "mixem.clustering",
        "mixem.kernels.nt_xent",
        "mixem.export.onnx",
        "mixem.cli.app",
        "mixem.bench.harness",
    } <= set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_and_function_sizes(name):
    path = MODULES[name]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)}: split it (one job per file)"
    long = [
        f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(ast.parse(text))
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.relative_to(ROOT)}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for name, path in MODULES.items():
        for mod, names, line in _imports(name, path):
            if mod.startswith("mixem") and mod != name:
                bad += [
                    f"{path.relative_to(ROOT)}:{line} imports {mod}.{n}"
                    for n in names
                    if n.startswith("_") and not n.startswith("__")
                ]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    graph = {name: _edges(name, path) for name, path in MODULES.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_readme_map_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Map of the code", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`((?:mixem|kernels|export|cli|bench|scripts)/[\w/]+\.(?:py|sh))`", section))
    files = {str(p.relative_to(ROOT)) for p in MODULES.values()} - {"cli/__init__.py", "bench/__init__.py"}
    assert not files - listed, f"modules missing from the README's map: {sorted(files - listed)}"
    assert all((ROOT / f).is_file() for f in listed), f"the map names files that do not exist: {sorted(listed)}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_result_file_and_link_a_document_names_exists(doc):
    text = doc.read_text()
    # Quoted JSON/SVG results (globs allowed; templates such as methods_<preset>__... are not files).
    quoted = set(re.findall(r"`(bench/results/[^`<>\s]+)`", text))
    missing = [q for q in sorted(quoted) if not any(ROOT.glob(q))]
    assert not missing, f"{doc.name} quotes result files that are not in the repository: {missing}"
    links = re.findall(r"\]\(((?:\.\./|docs/)?[\w\-]+\.md)(?:#([\w\-]+))?\)", text)
    if doc.name == "README.md":  # the README quotes results and links its lab notes: the patterns must find them
        assert quoted and links
    for target, anchor in links:
        path = doc.parent / target  # a Markdown link is relative to the document's folder
        assert path.is_file(), f"{doc.name} links to {target}, which does not exist"
        if anchor:
            slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}
            assert anchor in slugs, f"{doc.name} links to {target}#{anchor}, which names no heading there"
