import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs app servers, a browser and the tests side by side on two
# cores; OpenMP worker threads spinning against each other there made small
# convolutions 50× slower than one thread (measured), so each process gets one.
os.environ.setdefault("OMP_NUM_THREADS", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    """The built-in tiny model in a StreamV2V engine, one per test module."""
    from sv2v_core import StreamV2V, load_components

    engine = StreamV2V(load_components("tiny"))
    yield engine
    engine.close()
