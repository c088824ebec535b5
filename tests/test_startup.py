"""Start-up: the package imports lazily, the command starts without TensorFlow when it does not need it,
Keras files load after a bare ``import graphquant``, and the package's import graph has no cycles."""

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import graphquant

ROOT = Path(graphquant.__file__).resolve().parent.parent


def _python(code, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


def test_help_version_and_usage_errors_do_not_import_tensorflow():
    """``graphquant --help``/``--version``, a usage error (exit 2), no command, and ``python -m graphquant --help``
    never import TensorFlow (nor Keras): they take well under a second."""
    code = """
import runpy, sys
import graphquant
from graphquant.cli import main
codes = []
for argv in (["--help"], ["--version"], ["convert", "--bits"], ["frobnicate"]):
    try:
        codes.append(main(argv))
    except SystemExit as e:
        codes.append(e.code)
codes.append(main([]))  # no command: the help, exit 2
sys.argv = ["graphquant", "--help"]
try:
    runpy.run_module("graphquant", run_name="__main__", alter_sys=True)
except SystemExit as e:
    codes.append(e.code)
print(codes, sorted(m for m in ("tensorflow", "keras") if m in sys.modules))
"""
    p = _python(code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[0, 0, 2, 2, 2, 0] []"
    assert graphquant.__version__ in p.stdout


def test_python_m_graphquant_starts_as_quietly_as_the_console_script(tmp_path):
    """``python -m graphquant`` holds back TensorFlow's start-up lines like the ``graphquant`` command
    (TF_CPP_MIN_LOG_LEVEL unset): an error is one line on stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    p = subprocess.run([sys.executable, "-m", "graphquant", "convert", str(tmp_path / "missing"), str(tmp_path / "out"),
                        "--bits", "8"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"graphquant convert: error: {tmp_path / 'missing'}: no such file or directory"]


def test_top_level_api_is_lazy_and_narrow():
    """The top level holds the user API, imported on first use; internals live in their submodules."""
    p = _python("import sys, graphquant; print(sorted(m for m in ('tensorflow', 'keras', 'numpy') if m in sys.modules))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
    assert set(graphquant.__all__) <= set(dir(graphquant))
    for name in graphquant.__all__:
        assert getattr(graphquant, name) is not None
    from graphquant.patterns import Node

    assert "Node" not in graphquant.__all__
    with pytest.raises(AttributeError, match=r"graphquant\.patterns\.Node"):
        graphquant.Node  # noqa: B018
    assert Node.__module__ == "graphquant.patterns"
    assert graphquant.keras.Quantize.__module__ == "graphquant.keras.layers"
    assert (ROOT / "graphquant" / "py.typed").is_file()
    # a submodule of the same name as an exported function does not shadow it once imported
    p = _python("import sys, graphquant as gq; a = gq.compare; import graphquant.compare; from graphquant import compare; "
                "print(a is gq.compare is compare is sys.modules['graphquant.compare'].compare)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "True"
    importlib.import_module("graphquant.compare")
    assert graphquant.compare is sys.modules["graphquant.compare"].compare


@pytest.fixture(scope="module")
def quantized_keras_file(tmp_path_factory):
    import keras

    inp = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(2, 3, name="conv")(inp)
    model = keras.Model(inp, keras.layers.ReLU(name="relu")(x))
    q = graphquant.quantize_model(model, bits=8)
    path = tmp_path_factory.mktemp("startup") / "q.keras"
    q.save(path)
    x = np.random.RandomState(0).normal(size=(2, 6, 6, 1)).astype("float32")
    np.save(path.with_suffix(".npy"), x)
    np.save(path.with_suffix(".want.npy"), q.predict(x, verbose=0))
    return path


@pytest.mark.parametrize("imports", [
    "import graphquant; import keras",
    "import keras; import graphquant",
    "import graphquant; import tensorflow as tf; keras = tf.keras",  # TensorFlow imports Keras halfway through
    "import graphquant.ops; import keras",  # graphquant.ops is half executed while it imports TensorFlow and Keras
])  # fmt: skip
def test_keras_file_loads_after_import_graphquant(quantized_keras_file, imports):
    """README: importing graphquant registers its layers, so a quantized .keras file loads without custom_objects,
    whichever of graphquant and Keras is imported first."""
    path = quantized_keras_file
    code = f"""
import numpy as np
{imports}
m = keras.models.load_model({str(path)!r})
y = m.predict(np.load({str(path.with_suffix(".npy"))!r}), verbose=0)
np.testing.assert_array_equal(y, np.load({str(path.with_suffix(".want.npy"))!r}))
print(sorted(type(l).__name__ for l in m.layers if type(l).__module__.startswith("graphquant")))
"""
    p = _python(code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "['Quantize']"


def _module_graph(deferred=True):
    """Every module of the package -> the package modules it imports (at module level, and with ``deferred``
    inside functions too)."""
    pkg = ROOT / "graphquant"
    modules = {}
    for f in sorted(pkg.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)

    def known(name):  # graphquant.a.b.name -> the deepest module it names
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    def statements(tree):
        if deferred:
            yield from ast.walk(tree)
            return
        todo = list(tree.body)  # module level, including under if/try/with (not inside def or class bodies)
        while todo:
            node = todo.pop()
            yield node
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt))

    graph = {}
    for name, (f, is_pkg) in modules.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        out = set()
        for node in statements(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                out |= {known(a.name) for a in node.names if a.name.split(".")[0] == "graphquant"}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                    else node.module or ""
                if base.split(".")[0] == "graphquant":
                    out |= {known(f"{base}.{a.name}") for a in node.names}
        graph[name] = out - {"", name}
    # the package's lazy attributes (PEP 562) import their submodules when used
    if deferred:
        graph["graphquant"] |= {f"graphquant.{m}" for m in set(graphquant._EXPORTS.values()) | set(graphquant._SUBMODULES)}
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _report(graph, cycles):
    return "\n".join(" <-> ".join(c) + "\n" + "\n".join(f"    {m} imports {sorted(graph[m] & set(c))}" for m in c)
                     for c in cycles)


#: cycles closed only by imports inside functions (none left: the list may only shrink)
KNOWN_DEFERRED_CYCLES: list = []


def test_import_graph_has_no_cycles():
    """No module of graphquant imports, directly or through others, a module that imports it back.

    Parsed with ``ast``: every ``import``/``from ... import`` statement, relative ones resolved within
    graphquant; ``from pkg import name`` counts as importing ``pkg.name`` when that is a module. Importing a
    submodule also runs its parent packages' ``__init__``; that implicit edge is not counted.

    Module-level imports must have no cycle at all. Imports inside functions (deferred) count too, since a
    deferred import only hides a cycle until the function runs, as do the package's lazy attributes
    (``graphquant.quantize`` imports ``graphquant.ops``): with them, the only cycles allowed are the ones in
    :data:`KNOWN_DEFERRED_CYCLES`, exactly (a new one fails, and so does a fixed one still listed)."""
    graph = _module_graph(deferred=False)
    assert "graphquant.graph.rewrite" in graph and graph["graphquant.cli"], "the walker found the modules"
    cycles = _cycles(graph)
    assert not cycles, f"module-level import cycles:\n{_report(graph, cycles)}"
    graph = _module_graph(deferred=True)
    cycles = _cycles(graph)
    assert cycles == KNOWN_DEFERRED_CYCLES, f"import cycles (deferred imports included):\n{_report(graph, cycles)}"
