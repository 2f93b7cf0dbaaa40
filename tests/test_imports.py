"""Dependency direction (STYLE.md §3): lower layers never import higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imagebot"

# module (dotted, relative to imagebot) -> modules it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "errors": ("*",),
    "models": ("config", "store", "worker", "pipeline", "bot", "app", "providers", "delivery"),
    "config": ("store", "worker", "pipeline", "bot", "app", "providers", "delivery", "policy"),
    "store": ("worker", "pipeline", "bot", "app", "providers", "delivery", "policy", "media"),
    "providers": (
        "store",
        "worker",
        "pipeline",
        "bot",
        "app",
        "delivery",
        "policy",
        "media",
        "intake",
    ),
    "netguard": ("store", "worker", "pipeline", "bot", "app", "providers", "delivery"),
    "media": ("store", "worker", "pipeline", "bot.handlers", "app", "providers", "delivery"),
    "policy": ("worker", "pipeline", "bot", "app", "providers", "delivery", "media"),
    "delivery": ("store", "worker", "pipeline", "bot.handlers", "app", "providers", "policy"),
    "worker": ("bot.handlers", "bot.requests", "bot.edit", "bot.buttons", "app", "intake"),
    "pipeline": (
        "worker",
        "bot.handlers",
        "bot.requests",
        "bot.edit",
        "bot.buttons",
        "app",
        "intake",
    ),
    "bot": ("providers", "app", "media.GuardedFetcher"),
    "ops_server": ("worker", "pipeline", "bot", "app", "providers", "delivery", "intake"),
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name.removeprefix("imagebot.") for name in found if name.startswith("imagebot")}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def test_no_upward_imports() -> None:
    """Leaves stay leaves; bot/* never reaches providers; only app.py wires everything."""
    problems: list[str] = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        for layer, banned in FORBIDDEN.items():
            if name != layer and not name.startswith(f"{layer}."):
                continue
            for imported in imports_of(path):
                for ban in banned:
                    if ban == "*" or imported == ban or imported.startswith(f"{ban}."):
                        problems.append(f"{name} imports {imported}")
    assert problems == []


def test_only_cli_imports_app() -> None:
    """The composition root is imported by the CLI alone."""
    users = [
        module_name(p)
        for p in PACKAGE.rglob("*.py")
        if any(i == "app" or i.startswith("app.") for i in imports_of(p))
    ]
    assert users == ["cli"]
