"""Suite-wide test settings."""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drops every compiled executable after each test module. The whole suite runs in one
    process; without this it holds the executables of every module at once."""
    yield
    jax.clear_caches()
    gc.collect()
