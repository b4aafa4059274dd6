"""The house rules of the package layout (README, "Layout"), checked on the source itself.

Each rule is read from the code with ``ast``, so a change that breaks one fails here with the
offending file and line.
"""

import ast
from pathlib import Path

import fp16guard

PACKAGE = Path(fp16guard.__file__).parent
TESTS = Path(__file__).parent
STAGES = {"inspect", "bisection", "fixing"}
#: The shared layer every stage may use (besides backends/).
SHARED = {"cache", "compare", "control_flow", "deps", "errors", "files", "folding", "fp16", "fp16_onnx", "inputs", "jsonio", "loading",
          "onnx_graph", "plan", "polygraphy_io", "progress", "stats", "torch_graph", "backends"}


def _modules(root: Path):
    for path in sorted(root.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"))


def _imports(tree):
    """``(line, module, names)`` of every ``from fp16guard... import`` and ``import fp16guard...``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("fp16guard", "tests"):
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fp16guard":
                    yield node.lineno, a.name, []


def _where(path: Path) -> tuple[str, ...]:
    return path.relative_to(PACKAGE).with_suffix("").parts


def test_the_three_stages_are_packages_over_the_shared_layer():
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} >= STAGES | {"backends", "trt",
                                                                                            "rewriters", "examples"}
    for name in SHARED - {"backends"}:
        assert (PACKAGE / f"{name}.py").is_file(), name


def test_a_stage_imports_only_the_shared_layer_backends_and_itself():
    wrong = []
    for path, tree in _modules(PACKAGE):
        where = _where(path)
        if where[0] not in STAGES and where[0] not in SHARED:
            continue  # cli, openmmlab, rewriters, trt, examples stand above the stages
        for line, module, _ in _imports(tree):
            parts = module.split(".")
            if len(parts) < 2 or parts[1] == where[0]:
                continue
            if parts[1] not in SHARED:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_is_imported_across_modules():
    wrong = []
    for root in (PACKAGE, TESTS):
        for path, tree in _modules(root):
            for line, module, names in _imports(tree):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                private += [p for p in module.split(".") if p.startswith("_") and not p.startswith("__")]
                if private:
                    wrong.append(f"{path.name}:{line} from {module} imports {', '.join(private)}")
    assert not wrong, "\n".join(wrong)


def test_no_test_module_imports_another_test_module():
    wrong = []
    for path, tree in _modules(TESTS):
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            wrong += [f"{path.name}:{node.lineno} imports {m}" for m in mods if m.split(".")[-1].startswith("test_")]
    assert not wrong, "\n".join(wrong)


def test_fp16_max_is_the_only_spelling_of_the_limit():
    wrong = []
    for path, tree in _modules(PACKAGE):
        if path.name == "fp16.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value == 65504:
                wrong.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not wrong, "write fp16guard.fp16.FP16_MAX instead of 65504 at " + ", ".join(wrong)


def test_no_function_is_longer_than_80_lines_except_argparse_declarations():
    wrong = []
    for path, tree in _modules(PACKAGE):
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80 and not (path.name == "cli.py" and node.name == "_parser"):
                    wrong.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not wrong, "\n".join(wrong)


def test_every_error_raised_on_purpose_derives_from_the_one_base():
    from fp16guard import errors

    defined = [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}"
               for path, tree in _modules(PACKAGE) if path.name != "errors.py"
               for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name.endswith("Error")]
    assert not defined, "define exceptions in fp16guard/errors.py: " + ", ".join(defined)
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, errors.Fp16GuardError), cls
        assert cls.exit_code == (1 if issubclass(cls, errors.StillOverflowsError) else 2), cls
