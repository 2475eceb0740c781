"""Print setup.py's floors as exact pins, one requirement a line, for the floor
environment: every `name>=X` of install_requires and the test extra becomes
`name==X`. It reads setup.py's source (no build, no install), so a floor
changed there is the one pinned here: there is no second list."""
import ast
import pathlib
import sys

SETUP = pathlib.Path(__file__).resolve().parent.parent / "setup.py"


def requirements() -> list[str]:
    """install_requires and extras_require["test"], read from setup.py's source
    (lists may splice in a module-level list constant: `*DATA_EXTRA`)."""
    tree = ast.parse(SETUP.read_text())
    constants = {target.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 for target in node.targets if isinstance(target, ast.Name)}

    def value(node):
        if isinstance(node, ast.List):
            items = []
            for item in node.elts:
                items.extend(constants[item.value.id] if isinstance(item, ast.Starred) else [value(item)])
            return items
        if isinstance(node, ast.Dict):
            return {ast.literal_eval(k): value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.Name):
            return constants[node.id]
        return ast.literal_eval(node)

    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    keywords = {k.arg: value(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    return keywords["install_requires"] + keywords["extras_require"]["test"]


def pin(requirement: str) -> str:
    spec, _, marker = requirement.partition(";")
    name, sep, version = spec.partition(">=")
    if not sep or any(c in version for c in "<>=!,"):
        sys.exit(f"floor_pins: {requirement!r} in setup.py is not of the form name>=version")
    return f"{name.strip()}=={version.strip()}" + (f";{marker}" if marker else "")


if __name__ == "__main__":
    print("\n".join(pin(r) for r in requirements()))
