"""The house rules of the package layout (README, "Layout"), checked on the source itself.

Each rule is read from the code with ``ast``, so a change that breaks one fails here with the
offending file and line.
"""

import ast
import importlib
import importlib.util
import re
import tokenize
from pathlib import Path

import fp16guard

PACKAGE = Path(fp16guard.__file__).parent
TESTS = Path(__file__).parent
REPO = TESTS.parent
BENCHMARKS = REPO / "benchmarks"
STAGES = {"inspect", "bisection", "fixing"}
#: The shared layer every stage may use (besides backends/).
SHARED = {"cache", "compare", "control_flow", "control_flow_replay", "datasets", "deps", "distributed", "errors",
          "files", "folding", "fp16",
          "fp16_onnx", "inputs", "jsonio", "loading", "named_input", "onnx_graph", "onnx_ranges", "onnx_stats", "plan",
          "polygraphy_io", "progress", "stats", "torch_graph", "torch_onnx", "backends"}


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


# ---------------------------------------------------------------- names written in prose exist

#: A dotted name under the package, as prose writes it (``fp16guard.fixing.pipeline.FixResult``); not
#: a schema (``fp16guard.plan/1``, ``fp16guard.layer-precisions/1``) or a path.
DOTTED = re.compile(r"(?<![\w./-])fp16guard(?:\.[A-Za-z_]\w*)+(?![\w/-])")
#: Names written on purpose for a module that does not exist: name -> where and why.
NOT_YET_WRITTEN = {"fp16guard.backends.reference": "docs/backends.md: the example of a backend a reader adds"}


def _defined_at_top_level(path: str, name: str) -> bool:
    """``name`` is a class, function, assignment or import at the top of the module at ``path`` (for a
    module whose optional dependency is missing here, so it cannot be imported)."""
    for node in ast.parse(Path(path).read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


def _exists(dotted: str) -> bool:
    """The longest prefix of ``dotted`` that is a module, then the rest as attributes of it."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:i]))
        except ImportError:  # a parent that is not a package: fp16guard.fix is a function, not fp16guard/fix/
            spec = None
        if spec is None:
            continue
        rest = parts[i:]
        if not rest:
            return True
        try:
            obj = importlib.import_module(spec.name)
        except ImportError:  # an optional dependency (mmdeploy) missing here: read the source instead
            return len(rest) == 1 and spec.origin is not None and _defined_at_top_level(spec.origin, rest[0])
        for attr in rest:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _docstrings(path: Path):
    """``(line, text)`` of every docstring of a Python file: the module's, each class's and function's."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                yield body[0].lineno, body[0].value.value


def _comments(path: Path):
    """``(line, text)`` of every comment of a Python file."""
    with path.open(encoding="utf-8") as f:
        for tok in tokenize.generate_tokens(f.readline):
            if tok.type == tokenize.COMMENT:
                yield tok.start[0], tok.string


def _prose():
    """``(where, text)`` of the prose that names modules: README.md and docs/*.md line by line, the
    docstrings and comments of the package and the benchmarks, the tests' docstrings, and the notebooks'
    builder (its cells are text)."""
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield f"{path.relative_to(REPO)}:{k}", line
    for root, comments in ((PACKAGE, True), (BENCHMARKS, True), (TESTS, False)):
        for path in sorted(root.rglob("*.py")):
            for line, text in [*_docstrings(path), *(_comments(path) if comments else [])]:
                yield f"{path.relative_to(REPO)}:{line}", text
    builder = REPO / "notebooks" / "_build.py"
    for k, line in enumerate(builder.read_text(encoding="utf-8").splitlines(), 1):
        yield f"{builder.relative_to(REPO)}:{k}", line


def test_every_module_name_written_in_the_docs_and_docstrings_exists():
    """A module renamed or removed leaves no stale ``fp16guard.<old>.<name>`` behind in README.md, docs/,
    docstrings, comments or the notebooks' text (attributes such as ``fp16guard.fixing.pipeline.FixResult``
    included)."""
    seen: dict[str, bool] = {}
    wrong = []
    for where, text in _prose():
        for name in DOTTED.findall(text):
            if name not in seen:
                seen[name] = _exists(name)
            if not seen[name] and name not in NOT_YET_WRITTEN:
                wrong.append(f"{where}: {name}")
    assert seen, "no dotted fp16guard name found: the pattern is broken"
    assert not wrong, "names of no module or attribute:\n" + "\n".join(wrong)


#: A repository path as prose writes it: ``tests/test_fp16_onnx.py``, ``fp16guard/fixing/solver.py``.
REPO_PATH = re.compile(r"(?<![\w./-])(?:fp16guard|tests|benchmarks|notebooks|docs)/[\w/.-]*\w"
                       r"\.(?:py|md|ipynb|txt|json)\b")


def test_every_repository_file_named_in_the_docs_and_docstrings_exists():
    """A file moved or renamed (the PyTorch rewriter's tests, renamed after its module) leaves no stale
    path behind in the same prose."""
    wrong = [f"{where}: {path}" for where, text in _prose() for path in REPO_PATH.findall(text)
             if not (REPO / path).exists()]
    assert not wrong, "paths of no file:\n" + "\n".join(wrong)


# ---------------------------------------------------------------- the package and benchmarks stand alone


def _test_modules_imported(tree) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a test module: ``tests.*``, ``test_*`` or ``conftest``."""
    out = []
    for node in ast.walk(tree):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "tests" or any(p.startswith("test_") or p == "conftest" for p in parts):
                out.append((node.lineno, name))
    return out


def test_no_module_of_the_package_or_the_benchmarks_imports_a_test_module():
    """Test modules are pytest's to collect; a model that both a test and a benchmark need lives in a
    helper module under tests/ that both import (``tests/models.py``, ``tests/fix_cases.py``), not
    in a copy."""
    wrong = [f"{path.relative_to(REPO)}:{line} imports {name}"
             for root in (PACKAGE, BENCHMARKS) for path, tree in _modules(root)
             for line, name in _test_modules_imported(tree)]
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------- module size

MAX_MODULE_LINES = 600
#: Modules above :data:`MAX_MODULE_LINES` when the rule came (issue 25), each with its line count then:
#: a cap that may only come down. Splitting one below the limit removes its entry; none may be added.
LARGE_MODULES: dict[str, int] = {}  # cli.py (807), torch_graph.py (606) and fixing/pipeline.py (952) were split


def test_no_module_is_longer_than_600_lines_except_the_listed_ones_which_only_shrink():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        cap = LARGE_MODULES.get(name, MAX_MODULE_LINES)
        if lines > cap:
            wrong.append(f"fp16guard/{name}: {lines} lines, more than {cap}"
                         + ("" if name in LARGE_MODULES else "; split it (LARGE_MODULES takes no new entry)"))
    for name in LARGE_MODULES:
        path = PACKAGE / name
        if not path.is_file() or len(path.read_text(encoding="utf-8").splitlines()) <= MAX_MODULE_LINES:
            wrong.append(f"fp16guard/{name} is gone or within {MAX_MODULE_LINES} lines: remove it from LARGE_MODULES")
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------- results are values


def test_the_results_are_immutable_and_their_defaults_are_defined_once():
    """A plan, a bisect result and a fix result are built once; a step that changes one makes a new
    one (``dataclasses.replace``). Their defaults have one definition each."""
    import dataclasses

    from fp16guard.bisection.search import BisectResult
    from fp16guard.compare import DEFAULT_TOLERANCE
    from fp16guard.fixing.pipeline import FixResult, calibrate, fix_target
    from fp16guard.fixing.solver import solve
    from fp16guard.fp16 import DEFAULT_TOLERANCE as TOLERANCE
    from fp16guard.plan import DEFAULT_TARGET_LOG2, RewritePlan

    for cls in (RewritePlan, BisectResult, FixResult):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls.__name__
    result = BisectResult("m", "emulate", "relative_l2", 0.07, ["a"], notes=["n"])
    assert result.candidates == ("a",) and result.notes == ("n",)
    assert DEFAULT_TOLERANCE is TOLERANCE
    assert RewritePlan.__dataclass_fields__["target_log2"].default == DEFAULT_TARGET_LOG2
    for function in (calibrate, fix_target, solve):
        assert function.__kwdefaults__["target_log2"] == DEFAULT_TARGET_LOG2, function.__name__


def test_a_plan_written_with_a_retired_field_still_loads():
    """``fold_batchnorm`` (always true, read by nothing) left the plan; old files that carry it load."""
    from fp16guard.plan import RewritePlan

    plan = RewritePlan.from_json({"schema": "fp16guard.plan/1", "framework": "onnx", "source": "m",
                                  "model_sha256": "0", "fold_batchnorm": True})
    assert "fold_batchnorm" not in plan.to_json() and not hasattr(plan, "fold_batchnorm")
