"""The dependency rule of docs/ARCHITECTURE.md, checked on the source: layers import only to their
right, `decode` imports neither `ssd` nor `distributed`, no import circle (deferred imports too),
and the longest chain of module-level imports stays short."""

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "saguaro"
# cli -> bench -> server -> engine -> api, hf -> generator, config
#     -> decode, draft, ssd, tune, distributed -> model -> kernels
LAYERS = {
    "cli": 9,
    "bench": 8,
    "server": 7,
    "engine": 6,
    "api": 5,
    "hf": 5,
    "launch": 5,
    "generator": 4,
    "config": 4,
    "decode": 3,
    "draft": 3,
    "ssd": 3,
    "tune": 3,
    "distributed": 3,
    "model": 2,
    "kernels": 1,
}
ANYWHERE = {"saguaro.faults", "saguaro.hf.internals"}  # importable from every layer
MAX_CHAIN = 9


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(name: str, top_level_only: bool) -> set[str]:
    """The saguaro modules `name` imports (`from saguaro.x import y` counts y where y is a module)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[0] != "saguaro":
                continue
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                if child in MODULES:
                    found.add(child)
                elif alias.name != "_C":  # the compiled extension, not a source module
                    found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{name}: relative import; saguaro's modules import absolutely")
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("saguaro")}
    found.discard(name)
    return found


def layer(name: str) -> int | None:
    if name in ANYWHERE:
        return 0
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_layers_import_only_to_their_right():
    wrong = []
    for name in MODULES:
        for target in imports(name, top_level_only=False):
            low, high = layer(name), layer(target)
            if low is None or high is None:
                continue
            decode_to_ssd = name.startswith("saguaro.decode") and target.split(".")[1] in (
                "ssd",
                "distributed",
            )
            if high > low or decode_to_ssd:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_no_import_circle_deferred_imports_included():
    graph = {name: imports(name, top_level_only=False) for name in MODULES}
    state, circles = {}, []

    def visit(name, stack):
        state[name] = "open"
        stack.append(name)
        for target in graph[name]:
            if state.get(target) == "open":
                circles.append(stack[stack.index(target) :] + [target])
            elif target in graph and target not in state:
                visit(target, stack)
        stack.pop()
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])
    assert circles == []


def test_the_longest_chain_of_module_level_imports_is_short():
    graph = {name: imports(name, top_level_only=True) for name in MODULES}

    @cache
    def chain(name: str) -> tuple[str, ...]:
        longest = max((chain(target) for target in graph[name] if target in graph), key=len, default=())
        return (name, *longest)

    longest = max((chain(name) for name in graph), key=len)
    assert len(longest) <= MAX_CHAIN, " -> ".join(longest)


def test_every_subpackage_says_what_it_owns():
    packages = [path for path in PACKAGE.iterdir() if (path / "__init__.py").exists()]
    assert len(packages) >= 5
    for package in packages:
        assert ast.get_docstring(ast.parse((package / "__init__.py").read_text())), package.name
