"""protocol/ is sans-IO: it never imports trio, libp2p, node, sockets, logging or the clock."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_MODULES = {
    "trio",
    "libp2p",
    "node",
    "socket",
    "logging",
    "time",
    "datetime",
    "asyncio",
    "threading",
    "subprocess",
    "select",
    "selectors",
    "ssl",
    "http",
    "urllib",
    "random",
}
FORBIDDEN_CALLS = {("time", "time"), ("time", "monotonic"), ("datetime", "now"), ("os", "urandom")}


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            if name.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{path.name}:{node.lineno} imports {name}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            value = node.func.value
            if isinstance(value, ast.Name) and (value.id, node.func.attr) in FORBIDDEN_CALLS:
                found.append(f"{path.name}:{node.lineno} calls {value.id}.{node.func.attr}()")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            found.append(f"{path.name}:{node.lineno} uses __import__")
    return found


def test_protocol_is_sans_io():
    files = sorted((ROOT / "protocol").rglob("*.py"))
    assert len(files) >= 8
    problems = [v for f in files for v in violations(f)]
    assert problems == []


def test_the_checker_catches_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import trio\nfrom libp2p.host import x\nimport time\nt = time.time()\nfrom node import cli\n")
    found = violations(bad)
    assert len(found) == 5


def test_node_alone_imports_libp2p():
    """Only the adapter package node/net/ talks to libp2p (the rest of the daemon goes through it)."""
    offenders = []
    adapter = ROOT / "node" / "net"
    for path in sorted((ROOT / "node").rglob("*.py")):
        if adapter in path.parents:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)} imports {n}" for n in names if n.split(".")[0] == "libp2p"]
    assert offenders == []
