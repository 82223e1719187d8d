"""Measurement tools, apart from the product: benchmarks, load tests and their stand-ins.

    python -m bench.engine     the feature bank's speed and memory (paper Table 2), with the peer
    python -m bench.live       the app's live path: a real app, a real browser drawing
    python -m bench.loadtest   many simulated artists on one app
    python -m bench.appcheck   the app at the speed it serves, against the GPU targets
    python -m bench.raybench   the Ray Serve back end
    python -m bench.drill      faults, a dropped client, refused connections and stops, counted
    python -m bench.crossing   what a ZeroGPU call carries across the process boundary, each way

The engine benchmark's parts: frames (synthetic input), rows (what is
rendered), peer (the streamdiffusion package as a row), timing (rotation,
spread, ratios, memory), profile (per-stage times), report (markdown and
targets).  The app's tools: echo (an engine that returns its input, taking
a GPU's time), faults (the echo engine failing on purpose) and
channel_client (a Python page on the fast channel).
Nothing in sv2v_core/ or ui/ imports this package.
"""
