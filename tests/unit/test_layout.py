"""House rules, checked by reading the sources with ``ast`` (nothing is imported). Each failure lists every
offence as ``file:line: what``.

1. no actor method is called by a string: ``getattr(actor, "values")``, ``getattr(actor, name).remote()``,
   ``group.rank0("values")``;
2. no import cycle among the project modules; imports inside functions count, ``if TYPE_CHECKING:`` ones don't;
3. no private name (``_x``) of a rayrl module is used outside it, in project modules or tests: not imported,
   not read as ``module._x`` / ``Class._x``, not patched by name or dotted path.
"""

import ast
import functools
from collections import namedtuple
from pathlib import Path
from textwrap import dedent

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"rayrl": ROOT / "rayrl", "rayrl.actors": ROOT / "actors"}  # pyproject installs actors/ as rayrl.actors
# Calls that take a method's name: getattr, and helpers running one method on many actors (a leading "_"
# ignored). A new such helper would itself use getattr(actor, name).remote(...), which check 1 flags.
BY_NAME = {"getattr", "start", "all", "rank0", "call", "call_all", "fan_out", "broadcast"}

Source = namedtuple("Source", "name path tree")  # name: the dotted module name (a test file: its path)


def parse(name: str, text: str, path: str = "") -> Source:
    """The tree, with ``if TYPE_CHECKING:`` bodies dropped (they never run, so make no cycle and no use) and
    relative imports made absolute (``.`` is the module's package; in a package's ``__init__``, the package)."""
    path, parts = path or name, name.split(".")
    tree = ast.parse(text, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            node.body = [ast.Pass()]
        elif isinstance(node, ast.ImportFrom) and node.level:
            package = parts[:len(parts) - node.level + path.endswith("__init__.py")]
            node.module, node.level = ".".join(package + [node.module or ""]).strip("."), 0
    return Source(name, path, tree)


@functools.cache
def project_modules() -> dict:
    modules = {}
    for package, folder in PACKAGES.items():
        for file in sorted(folder.rglob("*.py")):
            name = ".".join([package, *file.relative_to(folder).with_suffix("").parts]).removesuffix(".__init__")
            modules[name] = parse(name, file.read_text(), file.relative_to(ROOT).as_posix())
    return modules


def is_private(name: str) -> bool:
    return name.startswith("_") and name != "_" and not (name.startswith("__") and name.endswith("__"))


def literal(node: ast.AST):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def call_name(node: ast.AST) -> str:  # "f" for f(...) and x.f(...); "" for anything else
    return (getattr(node.func, "id", None) or getattr(node.func, "attr", "")) if isinstance(node, ast.Call) else ""


def module_of(name: str, modules: dict):
    """The project module a dotted name lives in: its longest prefix that is a module (None if none)."""
    parts = name.split(".")
    return next((m for end in range(len(parts), 0, -1) if (m := ".".join(parts[:end])) in modules), None)


def actor_methods(sources) -> set:
    """Methods (no dunders, no properties) of the classes the sources define."""
    return {item.name for source in sources for cls in source.tree.body if isinstance(cls, ast.ClassDef)
            for item in cls.body if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            and not item.name.startswith("__") and "property" not in map(ast.unparse, item.decorator_list)}


def actor_call_offences(source: Source, methods: set):
    for node in ast.walk(source.tree):
        where = source.path, getattr(node, "lineno", 0)
        if isinstance(node, ast.Attribute) and node.attr in ("remote", "options"):
            if call_name(node.value) == "getattr":
                yield *where, f"getattr(...).{node.attr}(...): an actor method called by a name"
        elif call_name(node).lstrip("_") in BY_NAME:
            for name in {literal(arg) for arg in [*node.args, *(k.value for k in node.keywords)]} & methods:
                yield *where, f"{call_name(node)}(... {name!r} ...): actor method called by a string"


def import_cycle_offences(modules: dict):
    graph = {name: {} for name in modules}  # module -> {project module it imports: [lines]}
    for name, source in modules.items():
        for node in ast.walk(source.tree):  # `from rayrl.a import b` imports rayrl.a.b if that is a module
            if isinstance(node, ast.Import | ast.ImportFrom):
                base = f"{node.module}." if isinstance(node, ast.ImportFrom) else ""
                for target in filter(None, (module_of(base + alias.name, modules) for alias in node.names)):
                    graph[name].setdefault(target, []).append(node.lineno)
    reach = {}  # module -> every module it reaches through imports
    for start in graph:
        reach[start], todo = set(), [start]
        while todo:
            todo += set(graph[todo.pop()]) - reach[start]
            reach[start].update(todo)
    for a in graph:
        for b, lines in graph[a].items():
            if a in reach[b]:  # b leads back to a: the import a -> b is on a cycle
                yield from ((modules[a].path, line, f"{a} imports {b}, which leads back to {a}") for line in lines)


def private_offences(source: Source, modules: dict):
    bound = {}  # local name -> what it names: "rl" -> "rayrl.rl", "TrainerGroup" -> "rayrl.trainer_group.TrainerGroup"
    for node in ast.walk(source.tree):
        for a in node.names if isinstance(node, ast.Import) else []:  # `import a.b` binds a; `import a.b as c`, c
            bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        for a in node.names if isinstance(node, ast.ImportFrom) else []:
            bound[a.asname or a.name] = f"{node.module}.{a.name}"

    def resolve(node: ast.AST) -> str:  # rl._x.y -> rayrl.rl._x.y if rl is bound by an import, else ""
        head, _, rest = ast.unparse(node).partition(".")
        return ".".join(filter(None, [bound[head], rest])) if head in bound else ""

    for node in ast.walk(source.tree):
        used = []  # what the node reaches, as dotted names
        if isinstance(node, ast.Import | ast.ImportFrom):
            used = [f"{node.module}.{a.name}" if isinstance(node, ast.ImportFrom) else a.name for a in node.names]
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            used = [resolve(node)]
        elif call_name(node) in ("getattr", "setattr", "delattr", "hasattr", "object") and len(node.args) > 1:
            used = [f"{resolve(node.args[0])}.{literal(node.args[1])}"]  # setattr(rl, "_x"), patch.object(rl, "_x")
        if call_name(node) in ("setattr", "delattr", "patch") and node.args:
            used.append(literal(node.args[0]) or "")  # monkeypatch.setattr("rayrl.rl._x", ...), patch("rayrl.rl._x")
        for name in used:
            parts = name.split(".")
            if parts[0] == "rayrl" and any(map(is_private, parts)) and module_of(name, modules) != source.name:
                yield source.path, node.lineno, f"uses {name}"


def fail_with(title: str, offences) -> None:
    if offences := sorted(set(offences)):
        pytest.fail(f"{title} ({len(offences)}):\n" + "\n".join(f"{p}:{n}: {what}" for p, n, what in offences),
                    pytrace=False)


def test_each_check_fires_on_bad_code_only():
    modules = project_modules()  # first, the scan must see the project
    assert {"rayrl", "rayrl.cli", "rayrl.data.loading", "rayrl.actors", "rayrl.actors.engine"} <= set(modules)
    assert {"setup", "save_checkpoint"} <= actor_methods(modules.values())

    calls = parse("rayrl.calls", dedent("""
        def f(group, actor, rows, name):
            group.rank0("token_logprobs", batch)
            group._start(method="values")
            getattr(actor, "values")
            getattr(actor, name).remote()
            rows["values"], rows.get("values"), print("values"), getattr(actor, "weight", None)
            actor.values.remote(batch), group.rank0(lambda a: a.values.remote())
    """))
    assert {line for _, line, _ in actor_call_offences(calls, {"token_logprobs", "values"})} == {3, 4, 5, 6}

    cycle = {name: parse(name, code) for name, code in [
        ("rayrl.a", "if TYPE_CHECKING:\n    import rayrl.b"), ("rayrl.b", "import rayrl.a"),
        ("rayrl.c", "def f():\n    from rayrl import d"), ("rayrl.d", "from .c import f")]}
    assert sorted((path, line) for path, line, _ in import_cycle_offences(cycle)) == [("rayrl.c", 2), ("rayrl.d", 1)]

    test = parse("tests/t.py", dedent("""
        import rayrl.rl as rl
        from rayrl import submit as sub
        from rayrl.rl import _sample, run_rl
        from rayrl.trainer_group import TrainerGroup
        def test_x(monkeypatch, obj):
            rl._train, sub.one_line, rl.__name__, obj._private, run_rl, getattr(rl, "__doc__")
            TrainerGroup._combine
            monkeypatch.setattr(rl, "_train", None)
            monkeypatch.setattr("rayrl.rl._train", None), monkeypatch.setattr("rayrl.rl.run_rl", None)
    """))
    assert {line for _, line, _ in private_offences(test, modules)} == {4, 7, 8, 9, 10}


def test_no_actor_method_is_called_by_a_string():
    modules = project_modules()
    methods = actor_methods(source for name, source in modules.items() if name.startswith("rayrl.actors."))
    fail_with("actor methods called by a string; call the typed method (actor.method.remote(...) or a "
              "TrainerGroup method)", (o for source in modules.values() for o in actor_call_offences(source, methods)))


def test_no_import_cycles():
    fail_with("import cycles (imports inside functions count)", import_cycle_offences(project_modules()))


def test_no_private_name_is_used_outside_its_module():
    modules = project_modules()
    tests = [parse(file.relative_to(ROOT).as_posix(), file.read_text()) for file in (ROOT / "tests").rglob("*.py")]
    fail_with("private names of rayrl modules used outside them (use the public interface)",
              (o for source in [*modules.values(), *tests] for o in private_offences(source, modules)))
