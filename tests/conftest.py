import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The fast channel's keys (ui.live): the tests' clients make them from the same secret as their apps.
os.environ.setdefault("SV2V_CHANNEL_SECRET", "the tests' channel secret")
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


# The Ray back end's tests (tests/test_ray.py, and the Ray half of
# tests/test_renderer.py) share one local cluster with fake resources and one
# CanvasWorker deployment: two replicas of the built-in model on the CPU.
RAY_SESSIONS_PER_REPLICA = 4
RAY_REPLICAS = 2


@pytest.fixture(scope="session")
def ray_renderer():
    """A RayRenderer on two CanvasWorker replicas (skipped when ray is not installed)."""
    ray = pytest.importorskip("ray", reason="ray is optional: pip install -r requirements-ray.txt")
    from ray import serve

    from sv2v_core.config import StreamConfig
    from ui.ray_renderer import WorkerOptions, deploy

    ray.init(num_cpus=4, num_gpus=RAY_REPLICAS, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {name: os.environ[name] for name in
                                       ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}})
    base = StreamConfig(width=64, height=64, mode="latency", similarity_skip=None)
    renderer = deploy(WorkerOptions(model="tiny", base=base, max_sessions=RAY_SESSIONS_PER_REPLICA,
                                    torch_threads=1), replicas=RAY_REPLICAS)
    yield renderer
    renderer.shutdown()
    serve.shutdown()
    ray.shutdown()
