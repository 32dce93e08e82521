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
