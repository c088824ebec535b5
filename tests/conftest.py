"""Shared pytest configuration: keep TensorFlow quiet. Keep this file generic."""

import os

# Must happen before TensorFlow is imported by any test module.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# the tests' commands print full-width tables, as when piped: pytest-xdist's workers run with COLUMNS=80 set,
# which graphquant's tables would fit (tests that fit tables set COLUMNS themselves)
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _quiet_tensorflow():
    """Silence TensorFlow's Python logger (retracing warnings and the like)."""
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover
        yield
        return
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    yield
    logger.setLevel(level)


#: the longest test files, started first: with two workers each taking whole files (pytest-xdist's
#: --dist loadfile), a long file started last would run alone at the end
LONGEST_FIRST = ("test_zoo.py", "test_ops.py", "test_safety.py", "test_tflite.py", "test_cli.py", "test_fake_quant.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
