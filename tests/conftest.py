"""Shared pytest configuration: keep TensorFlow quiet. Keep this file generic."""

import os

# Must happen before TensorFlow is imported by any test module.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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
