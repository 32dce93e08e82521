import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


@pytest.fixture
def shared_data():
    """Path to ../shared/data; tests that need the real corpora skip when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer_files():
    """(vocab.json, merges.txt, tokenizer.json) of the committed 2048-token byte-level BPE fixture."""
    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tokenizer")
    return (os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), os.path.join(d, "tokenizer.json"))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (exhaustive sweeps; minutes to an hour)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an exhaustive sweep left out of the default run (--run-slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow sweep: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
