"""Dependency direction (STYLE.md §3): lower layers never import higher ones, not even through
a module in between (services.py is the usual way round: type against `Services` under
`TYPE_CHECKING` instead). Imports inside `if TYPE_CHECKING:` are for the type checker only and
do not count."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imagebot"

# Leaves: module -> the only imagebot modules it may import.
LEAVES: dict[str, tuple[str, ...]] = {
    "errors": (),
    "clock": (),
    "models": (),
    "texts": ("models",),
}

# module (dotted, relative to imagebot; a package covers its modules) -> what it must never
# reach, directly or through what it imports. "media.GuardedFetcher" bans one name (direct).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "config": ("store", "worker", "pipeline", "app", "providers", "delivery", "policy"),
    "store": ("worker", "pipeline", "app", "providers", "delivery", "policy", "media"),
    "providers": (
        "store",
        "worker",
        "pipeline",
        "app",
        "delivery",
        "policy",
        "media",
        "intake",
        "services",
    ),
    "netguard": ("store", "worker", "pipeline", "app", "providers", "delivery"),
    "media": ("store", "worker", "pipeline", "app", "providers", "delivery"),
    # results are kept in the database on PostgreSQL (result_blobs): results may use store
    "results": ("worker", "pipeline", "app", "providers", "delivery", "services"),
    "breaker": ("store", "worker", "pipeline", "app", "providers", "delivery", "services"),
    "policy": ("worker", "pipeline", "app", "providers", "delivery", "media"),
    "delivery": ("store", "worker", "pipeline", "app", "providers", "policy", "services"),
    "progress": ("worker", "pipeline", "app", "providers", "intake", "services"),
    "credits": ("worker", "pipeline", "app", "providers", "intake", "services"),
    "stars": ("worker", "pipeline", "app", "providers", "intake", "services"),
    "intake": ("worker", "pipeline", "app", "providers", "delivery", "services"),
    "pipeline": ("worker", "app", "intake", "services"),
    "worker": ("app", "intake", "services"),
    "services": ("app",),
    "bot": ("providers", "worker", "pipeline", "services", "app", "media.GuardedFetcher"),
    "ops_server": (
        "worker",
        "pipeline",
        "app",
        "providers",
        "delivery",
        "intake",
        "services",
    ),
}

# Only the handlers themselves and what wires them may reach imagebot.bot.
BOT_USERS = ("bot", "app", "cli", "__main__")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(body: Iterable[ast.stmt]) -> Iterable[ast.stmt]:
    """Every statement, nested ones included, except the bodies of `if TYPE_CHECKING:`."""
    for node in body:
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.orelse)
            continue
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from _statements(getattr(node, field, []))


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package).with_suffix("").parts
    if len(parts) > 1 and parts[-1] == "__init__":
        parts = parts[:-1]  # a package is imported by its own name
    return ".".join(parts)


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """The imagebot modules and names `path` imports at run time (`imagebot.` stripped):
    `from imagebot.x import Y` gives `x` and `x.Y`; `from imagebot import texts` gives `texts`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    root = package.name
    found: set[str] = set()
    for node in _statements(tree.body):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module != root and not node.module.startswith(f"{root}."):
                continue
            base = node.module.removeprefix(root).lstrip(".")
            if base:
                found.add(base)
            found.update(f"{base}.{a.name}".lstrip(".") for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix(f"{root}.")
                for a in node.names
                if a.name.startswith(f"{root}.")
            )
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> what it imports at run time (modules and names, as `imports_of` gives them)."""
    return {module_name(p, package): imports_of(p, package) for p in package.rglob("*.py")}


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` reaches at run time -> the module that imports it on the way."""
    via: dict[str, str] = {}
    todo = [start]
    while todo:
        here = todo.pop()
        for imported in graph.get(here, set()):
            if imported in graph and imported not in via and imported != start:
                via[imported] = here
                todo.append(imported)
    return via


def _path(via: dict[str, str], start: str, end: str) -> str:
    chain = [end]
    while chain[-1] != start:
        chain.append(via[chain[-1]])
    return " -> ".join(reversed(chain))


def _matches(imported: str, ban: str) -> bool:
    return imported == ban or imported.startswith(f"{ban}.")


def _in_layer(name: str, layer: str) -> bool:
    return name == layer or name.startswith(f"{layer}.")


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every forbidden import, direct or through other modules, with the chain that makes it."""
    problems: list[str] = []
    for name, direct in graph.items():
        via = reachable(graph, name)
        for leaf, allowed in LEAVES.items():
            if name == leaf:
                problems += [
                    f"{name} (a leaf) imports {i}"
                    for i in direct
                    if not any(_matches(i, ok) for ok in allowed)
                ]
        for layer, banned in FORBIDDEN.items():
            if not _in_layer(name, layer):
                continue
            for ban in banned:
                problems += [f"{name} imports {i}" for i in direct if _matches(i, ban)]
                problems += [
                    f"{name} reaches {m}: {_path(via, name, m)}"
                    for m in via
                    if _matches(m, ban) and m not in direct
                ]
        if not any(_in_layer(name, user) for user in BOT_USERS):
            problems += [
                f"{name} reaches {m}: {_path(via, name, m)}" for m in via if _in_layer(m, "bot")
            ]
    return sorted(set(problems))


def test_no_upward_imports() -> None:
    """Leaves stay leaves; no lower layer reaches bot/ or a higher layer, even indirectly."""
    assert violations(import_graph()) == []


def test_the_check_sees_through_modules_in_between(tmp_path: Path) -> None:
    """A lower layer reaching a higher one through services.py is caught, with its chain;
    the same import under TYPE_CHECKING is not."""
    package = tmp_path / "imagebot"
    (package / "bot").mkdir(parents=True)
    (package / "delivery.py").write_text("from imagebot import services\n")
    (package / "services.py").write_text("from imagebot.bot.handlers import register\n")
    (package / "ops_server.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from imagebot.services import Services\n"
    )
    (package / "bot" / "handlers.py").write_text("def register() -> None: ...\n")
    found = violations(import_graph(package))
    assert "delivery imports services" in found
    assert "delivery reaches bot.handlers: delivery -> services -> bot.handlers" in found
    assert "services reaches bot.handlers: services -> bot.handlers" in found
    assert not [p for p in found if p.startswith("ops_server")]


def test_only_cli_imports_app() -> None:
    """The composition root is imported by the CLI alone."""
    users = [
        name for name, found in import_graph().items() if any(_matches(i, "app") for i in found)
    ]
    assert users == ["cli"]
