"""The benchmark: how rows are timed (rotation, spread, ratios), that the
peer does the same work as our no-bank row, and the CPU smoke run of the
command on the tiny model.  No timing assertions: a fake clock stands in
where the arithmetic on times is checked."""

import json

import numpy as np
import pytest
import torch

from sv2v_core import StreamV2V, images
from sv2v_core.attention import BankAttnProcessor
from sv2v_core.config import BankConfig
from sv2v_core.models import load_components
from bench import engine as bench_engine
from bench import frames as bench_frames
from bench import peer as bench_peer
from bench import report as bench_report
from bench import rows as bench_rows
from bench import timing as bench_timing

SIZE = 64


def test_synthetic_frames_move_without_looking_like_a_scene_cut():
    frames = bench_frames.synthetic_frames(6, SIZE)
    for a, b in zip(frames, frames[1:]):
        similarity = images.similarity(images.thumbnail(a), images.thumbnail(b))
        assert 0.8 < similarity < 0.995  # never skipped, never a bank reset
        assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE, 3)


def test_warmup_fills_the_bank():
    cpu = torch.device("cpu")
    assert bench_rows.default_warmup(BankConfig(mode="queue", size=4), cpu, False) == 4 * 3 + 2
    assert bench_rows.default_warmup(BankConfig(mode="dyme"), cpu, False) == 4 + 2
    assert bench_rows.default_warmup(BankConfig(mode="none"), torch.device("cuda"), False) == 10


# ---------------------------------------------------------------- rotation, on a fake clock


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeRow:
    """Costs `cost(n)` seconds of the fake clock on its n-th call; logs what it was given."""

    def __init__(self, key, clock, log, warmup=1, cost=lambda n: 1.0):
        self.key, self.clock, self.log, self.warmup, self.cost = key, clock, log, warmup, cost
        self.given = []

    def __call__(self, frame):
        self.given.append(frame)
        self.log.append(self.key)
        self.clock.now += self.cost(len(self.given))


def test_rotation_gives_every_row_the_same_timed_frames_in_rotating_order():
    clock, log = Clock(), []
    rows = [FakeRow("a", clock, log, warmup=2, cost=lambda n: n), FakeRow("b", clock, log, warmup=0),
            FakeRow("c", clock, log)]
    frames = list(range(10))
    medians = bench_timing.time_rows(rows, frames, rounds=4, block=3, device=torch.device("cpu"), clock=clock)
    assert medians["a"] == [4, 7, 10, 13]  # the middle frame of its blocks (calls 3-5, 6-8, ...), each timed alone
    assert medians["b"] == medians["c"] == [1, 1, 1, 1]
    for row in rows:  # its own run of frames from the first, warm-up then 4 blocks of 3
        assert row.given == [i % 10 for i in range(row.warmup + 12)]
    timed = log[3:]  # after the warm-ups (2 + 0 + 1 frames)
    blocks = [timed[i] for i in range(0, len(timed), 3)]
    assert all(timed[i:i + 3] == [timed[i]] * 3 for i in range(0, len(timed), 3))  # whole blocks
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]  # rotated by one per round


def test_a_rows_figures_do_not_depend_on_the_other_rows():
    """By construction: a row's own sequence of work gives the same figures
    whichever rows share the run and wherever it sits in the rotation."""
    own_cost = lambda n: 10 + n % 5 + (50 if n % 7 == 0 else 0)  # noqa: E731  (whole numbers: exact sums)

    def figures(neighbours: list[str], position: int) -> list[float]:
        clock, log = Clock(), []
        rows = [FakeRow(key, clock, log, cost=lambda n: 30) for key in neighbours]
        rows.insert(position, FakeRow("dyme1", clock, log, warmup=6, cost=own_cost))
        return bench_timing.time_rows(rows, list(range(64)), rounds=5, block=3, device=torch.device("cpu"),
                               clock=clock)["dyme1"]

    alone = figures([], 0)
    assert len(set(alone)) > 1  # the row's own costs vary from round to round
    assert figures(["none"], 1) == alone
    assert figures(["none", "queue1", "peer"], 2) == alone


@pytest.fixture(scope="module")
def engines():
    """Our engine on the tiny model and the peer's components (its own UNet copy)."""
    components = load_components("tiny")
    peer_parts = bench_peer.peer_components(components)
    engine = StreamV2V(components)
    yield engine, peer_parts
    engine.close()


class Recorder:
    """A row that keeps the images its row returns."""

    def __init__(self, row) -> None:
        self.row, self.key, self.warmup, self.images = row, row.key, row.warmup, []

    def __call__(self, frame):
        self.images.append(self.row(frame))


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_a_rows_renders_do_not_depend_on_the_other_rows(engines, mode):
    """Each row has its own stream: DyMe renders the same frames, bit for
    bit, alone and between the no-bank row and the peer."""
    engine, peer_parts = engines
    frames = bench_frames.synthetic_frames(64, SIZE)

    def dyme_images(others: list) -> list[np.ndarray]:
        dyme = Recorder(bench_rows.EngineRow(engine, "dyme1", SIZE, 2, mode))
        rows = [*others[:1], dyme, *others[1:]]
        for row in rows:
            row.row.start() if isinstance(row, Recorder) else row.start()
        bench_timing.time_rows(rows, frames, rounds=3, block=2, device=engine.device)
        return dyme.images

    alone = dyme_images([])
    shared = dyme_images([bench_rows.EngineRow(engine, "none", SIZE, 2, mode),
                          bench_peer.PeerRow(peer_parts, SIZE, 2, mode, torch.float32, warmup=1)])
    assert len(alone) == 6 + 3 * 2
    assert all(np.array_equal(a, b) for a, b in zip(alone, shared, strict=True))


# ---------------------------------------------------------------- ratios and the table


def row(key, label, mode, round_ms, steps=4):
    return bench_timing.Row(key, label, steps, mode, len(round_ms), 3, 1, round_ms, None, "n/a", 0.0)


def test_ratios_pair_each_round_with_the_same_runs_no_bank_row_and_peer():
    none = row("none", "no bank", "stream", [10.0, 20.0, 40.0])
    dyme = row("dyme1", "DyMe(1)", "stream", [12.0, 22.0, 48.0])
    peer = row("peer", "peer", "stream", [10.0, 25.0, 40.0])
    other_none = row("none", "no bank", "latency", [100.0, 100.0, 100.0])
    other_dyme = row("dyme1", "DyMe(1)", "latency", [110.0, 130.0, 120.0])
    lone = row("dyme1", "DyMe(1)", "stream", [5.0, 5.0, 5.0], steps=1)  # a group without a no-bank row
    bench_timing.add_ratios([none, dyme, peer, other_none, other_dyme, lone])
    assert dyme.ratio_time == pytest.approx([1.2, 1.1, 1.2])  # per round 1.2, 1.1, 1.2: median, min, max
    assert none.ratio_time == [1.0, 1.0, 1.0]
    assert none.ratio_peer == pytest.approx([1.0, 0.8, 1.0])
    assert dyme.ratio_peer == pytest.approx([1.2, 0.88, 1.2])
    assert other_dyme.ratio_time == pytest.approx([1.2, 1.1, 1.3])  # its own mode's no-bank row
    assert other_dyme.ratio_peer is None and lone.ratio_time is None
    assert (dyme.ms, dyme.ms_min, dyme.ms_max) == (22.0, 12.0, 48.0)
    assert dyme.fps == pytest.approx(1000 / 22.0)


def test_markdown_shows_min_median_max_and_the_ratio_spread():
    none = row("none", "no bank", "stream", [10.0, 20.0, 40.0])
    dyme = row("dyme1", "DyMe(1)", "stream", [12.0, 22.0, 48.0])
    bench_timing.add_ratios([none, dyme])
    result = {"environment": {"device_name": "CPU", "model": "tiny", "size": 64, "dtype": "float32", "accel": "",
                              "load_average": [0.5, 1.25], "cpu_count": 2, "threads": 1},
              "rows": [none.__dict__, dyme.__dict__], "command": "python -m bench.engine"}
    table = bench_report.markdown(result)
    assert "| DyMe(1) | 22.0 (12.0–48.0) | 45.45 | 1.200 (1.100–1.200) | n/a |" in table
    assert "| no bank | 20.0 (10.0–40.0) |" in table
    assert "median (min–max)" in table and "3 rounds of 3 frames per row" in table
    assert "0.50 / 1.25" in table


# ---------------------------------------------------------------- the peer does our no-bank row's work


def unet_calls(unet, render, frame) -> list[tuple]:
    """(batch shape, timesteps, prompt batch, dtype) of every UNet call while rendering `frame`."""
    calls = []

    def hook(module, args, kwargs):
        sample = args[0]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        embeds = kwargs["encoder_hidden_states"]
        calls.append((tuple(sample.shape), torch.as_tensor(timestep).flatten().tolist(), embeds.shape[0],
                      sample.dtype))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        render(frame)
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("mode, steps", [("stream", 4), ("latency", 4), ("latency", 1)])
def test_the_peer_makes_the_same_unet_calls_as_our_no_bank_row(engines, mode, steps):
    engine, peer_parts = engines
    ours = bench_rows.EngineRow(engine, "none", SIZE, steps, mode)
    peer = bench_peer.PeerRow(peer_parts, SIZE, steps, mode, torch.float32, warmup=1)
    ours.start(), peer.start()
    frames = bench_frames.synthetic_frames(3, SIZE)
    for frame in frames[:2]:
        ours(frame), peer(frame)
    our_calls = unet_calls(engine.unet, ours, frames[2])
    assert our_calls == unet_calls(peer_parts.unet, peer, frames[2])
    batch = steps if mode == "stream" else 1
    assert len(our_calls) == (1 if mode == "stream" else steps) and our_calls[0][0][0] == batch
    image = peer(frames[2])
    assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)


def test_the_peer_runs_diffusers_processors_on_its_own_unet(engines):
    engine, peer_parts = engines
    assert peer_parts.unet is not engine.unet and peer_parts.vae is engine.vae
    assert all(isinstance(p, BankAttnProcessor) for p in engine.unet.attn_processors.values())
    assert not any(isinstance(p, BankAttnProcessor) for p in peer_parts.unet.attn_processors.values())
    with pytest.raises(ValueError, match="before StreamV2V patches it"):
        bench_peer.peer_components(engine.components)


# ---------------------------------------------------------------- the command


def test_bench_writes_every_row_with_its_spread_and_ratios(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code = bench_engine.main(["--model", "tiny", "--size", str(SIZE), "--steps", "2", "--rounds", "2", "--block", "2",
                           "--warmup", "1", "--device", "cpu", "--output", str(tmp_path), "--quiet"])
        assert torch.get_num_threads() == 2  # given back
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["environment"]["threads"] == 1 and result["environment"]["clock"] == "cpu"  # the CPU defaults
    rows = result["rows"]
    assert [(r["key"], r["mode"]) for r in rows] == [(k, m) for m in ("stream", "latency") for k in bench_rows.ROWS]
    for r in rows:
        assert r["rounds"] == 2 and r["block"] == 2 and r["steps"] == 2 and len(r["round_ms"]) == 2
        assert 0 < r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert r["ratio_time"] is not None and r["ratio_peer"] is None
    for mode in ("stream", "latency"):
        by_key = {r["key"]: r for r in rows if r["mode"] == mode}
        assert by_key["none"]["ratio_time"] == [1.0, 1.0, 1.0]
        assert by_key["none"]["bank_mib"] == 0
        assert by_key["dyme1"]["bank_mib"] > 0 and by_key["queue1"]["bank_mib"] > 0
    markdown = (tmp_path / "bench.md").read_text()
    assert "| DyMe(1) |" in markdown and "| queue(4) |" in markdown and "median (min–max)" in markdown
    assert "2-step LCM, stream batch" in markdown and "2-step LCM, latency mode" in markdown
    assert "| DyMe(1) |" in capsys.readouterr().out


def test_bench_profile_and_peer(tmp_path, capsys):
    code = bench_engine.main(["--model", "tiny", "--size", str(SIZE), "--steps", "4", "--modes", "stream", "--rows", "none",
                       "dyme1", "--rounds", "1", "--block", "1", "--profile", "--profile-frames", "1",
                       "--peer", "--clock", "wall", "--device", "cpu", "--output", str(tmp_path), "--quiet"])
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["environment"]["clock"] == "wall"
    profiles = {p["row"]: p for p in result["profiles"]}
    keys = [r["key"] for r in result["rows"]]
    dyme = profiles["dyme1"]["ms_per_frame"]
    for stage in ("frame (total)", "autoencoder encode", "UNet call", "autoencoder decode (+ to host)",
                  "bank update", "host work (rest of the frame)"):
        assert stage in dyme
    assert profiles["dyme1"]["calls_per_frame"]["UNet call"] == 1  # stream batch: one call a frame
    assert profiles["dyme1"]["ms_per_frame"]["bank update"] > 0
    if bench_peer.peer_problem() is None:
        assert keys == ["none", "dyme1", "peer"]
        assert set(profiles) == {"none", "dyme1", "peer"}
        peer = profiles["peer"]["ms_per_frame"]
        for stage in ("autoencoder encode", "UNet call", "autoencoder decode (+ to host)"):
            assert stage in peer
        assert "streamdiffusion" in result["peer_note"]
        none = next(r for r in result["rows"] if r["key"] == "none")
        assert none["ratio_peer"] is not None
        assert "our no-bank / peer no-bank time" in (tmp_path / "bench.md").read_text()
    else:  # not installed: said plainly, and the rest still runs
        assert keys == ["none", "dyme1"]
        assert "not usable" in result["peer_note"]
        assert "peer: not run" in capsys.readouterr().err
