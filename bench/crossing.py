"""`python -m bench.crossing`: what one ZeroGPU call carries across the process boundary.

A DyMe stream of SD1.5 shapes (the built-in "sd15-random": SD1.5's full
architecture, random weights) at 512², latency mode, is rendered for a few
frames on the CPU; then the payloads of one canvas call are sent to a
forked process and back, as `spaces.GPU` does:

- before: the call takes the stream's whole state in and brings it back
  (ui.local_renderer.Step with the StreamState; (state, output) back);
- after (ui.crossing): the call carries the frame, the settings and the
  stream's key and version (a `Call`) and brings back the render (an
  `Answer`); every CHECKPOINT_EVERY-th call also brings the full state back,
  and a call that meets a new worker sends it in full (a restore: the
  checkpoint and the calls since).

And one chunk of a video's translation (VIDEO_CHUNK frames; the same
stream's state stands for the video's): before, the stream went in and came
back with every chunk; after, a chunk carries its frames in and their
images out, and the stream comes back every CHECKPOINT_EVERY-th chunk.

Each payload (a fresh copy each time) is sent through a pipe with multiprocessing's pickler, which,
once torch.multiprocessing is imported (as `spaces` does), moves tensors
into shared memory and sends only a handle through the pipe.  Printed per
direction: bytes through the pipe + bytes of tensors in shared memory, the
median milliseconds from the send to the received object, and the plain
pickle's bytes and milliseconds to pickle and unpickle (what a pickling
without shared memory costs, as tests/fake_spaces does) (both directions
are timed from this process to one forked before any model work: a
process that forks after torch's threads ran may hang).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import pickle
import statistics
import time
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # noqa: F401  (registers the tensor reductions that use shared memory)

from sv2v_core.config import StreamConfig
from sv2v_core.loader import EngineOptions, load_engine
from sv2v_core.engine import Translation
from ui.crossing import CHECKPOINT_EVERY, VIDEO_CHUNK, Answer, HeldStream, VideoAnswer, VideoStream
from ui.local_renderer import Step

from .frames import synthetic_frames


def tensor_bytes(value) -> int:
    """Bytes of the tensors inside `value` (found through pickling: what goes to shared memory)."""
    total = 0

    class Counter(pickle.Pickler):
        def persistent_id(self, obj):
            nonlocal total
            if isinstance(obj, torch.Tensor):
                total += obj.numel() * obj.element_size()
            return None

    Counter(_Sink()).dump(value)
    return total


class _Sink:
    def write(self, data) -> int:
        return len(data)


def _child(connection) -> None:
    """The other process: receive payloads until None, answering each with the seconds since its send."""
    while (message := connection.recv()) is not None:
        sent_at, _ = message
        connection.send(time.perf_counter() - sent_at)


class Receiver:
    """A process forked before any model work (a process that forks after torch's threads ran may
    hang), that receives payloads and says how long each took to arrive."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self._connection, theirs = context.Pipe()
        self._process = context.Process(target=_child, args=(theirs,), daemon=True)
        self._process.start()

    def seconds(self, payload, repeats: int) -> float:
        """Median seconds for a fresh copy of `payload` to arrive (fresh: a tensor sent once already
        stays in shared memory, where a call's new tensors would not be)."""
        times = []
        for _ in range(repeats):
            fresh = copy.deepcopy(payload)
            self._connection.send((time.perf_counter(), fresh))
            times.append(self._connection.recv())
        return statistics.median(times)

    def close(self) -> None:
        self._connection.send(None)
        self._process.join(timeout=30)


def measure(receiver: Receiver, pairs: list[tuple[str, object, object]], repeats: int) -> list[dict]:
    """Per (name, payload in, payload out): bytes and the median seconds to cross, each way."""
    rows = []
    for name, payload_in, payload_out in pairs:
        rows.append(dict(name=name,
                         pipe_in=len(ForkingPickler.dumps(payload_in)), shm_in=tensor_bytes(payload_in),
                         pickle_in=len(pickle.dumps(payload_in)), seconds_in=receiver.seconds(payload_in, repeats),
                         pickled_in=_pickling_seconds(payload_in, repeats),
                         pipe_out=len(ForkingPickler.dumps(payload_out)), shm_out=tensor_bytes(payload_out),
                         pickle_out=len(pickle.dumps(payload_out)),
                         seconds_out=receiver.seconds(payload_out, repeats),
                         pickled_out=_pickling_seconds(payload_out, repeats)))
    return rows


def _pickling_seconds(payload, repeats: int) -> float:
    """Median seconds to pickle and unpickle `payload` plainly (copies, no shared memory)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        pickle.loads(pickle.dumps(payload))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-random", help="model (default sd15-random: SD1.5 shapes)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--frames", type=int, default=3, help="frames rendered before measuring (default 3)")
    parser.add_argument("--dtype", default="float32", help="the stream's dtype (float32 on a CPU; float16 on a GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    receiver = Receiver()
    loaded = load_engine(EngineOptions(model=args.model, device="cpu", dtype=args.dtype))
    engine = loaded.engine
    config = StreamConfig(width=args.size, height=args.size, steps=args.steps, mode="latency",
                          similarity_skip=None, scene_cut=None).replace(bank_mode="dyme", bank_merge_every=1)
    frames = synthetic_frames(args.frames + 1, args.size)
    state = engine.new_stream(config)
    started = time.perf_counter()
    for frame in frames[:-1]:
        output = engine(state, frame)
    print(f"{args.frames} frames of {args.model} at {args.size}² ({args.dtype}, latency, DyMe, {args.steps} steps) "
          f"rendered in {time.perf_counter() - started:.1f} s; bank {state.bank.nbytes() / 1e6:.1f} MB")
    frame = frames[-1]
    held = HeldStream()
    call = held.call(Step(state, config, frame))
    light = Answer(output, state.frames_in)
    full = Answer(output, state.frames_in, state)
    restore = held.restoring(call)
    restore.checkpoint, restore.since = state, ()
    pairs = [
        ("before: state in and out (every call)", [Step(state, config, frame)], [(state, output)]),
        ("after: a call", [call], [light]),
        (f"after: every {CHECKPOINT_EVERY}th call (state back)", [call], [full]),
        ("after: a new worker (state in, once)", [restore], [light]),
    ]
    chunk_frames = [frame.copy() for _ in range(VIDEO_CHUNK)]  # copies: pickling sends a repeated object once
    chunk_images = [output.image.copy() for _ in range(VIDEO_CHUNK)]
    chunk = HeldStream().chunk(config, chunk_frames)
    pairs += [
        ("video chunk before: state in and out (every chunk)", (config, chunk_frames, state, Translation()),
         (chunk_images, state, Translation())),
        ("video chunk after", chunk, VideoAnswer(chunk_images)),
        (f"video chunk after, every {CHECKPOINT_EVERY}th (state back)", chunk,
         VideoAnswer(chunk_images, VideoStream(state))),
    ]
    rows = measure(receiver, pairs, args.repeats)
    receiver.close()
    print("| call | in: pipe + shared memory | ms | plain pickle | ms | out: pipe + shared memory | ms "
          "| plain pickle | ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['name']} | {_mb(row['pipe_in'])} + {_mb(row['shm_in'])} | {row['seconds_in'] * 1e3:.1f} | "
              f"{_mb(row['pickle_in'])} | {row['pickled_in'] * 1e3:.1f} | "
              f"{_mb(row['pipe_out'])} + {_mb(row['shm_out'])} | {row['seconds_out'] * 1e3:.1f} | "
              f"{_mb(row['pickle_out'])} | {row['pickled_out'] * 1e3:.1f} |")
    average = (rows[1]["pickle_out"] * (CHECKPOINT_EVERY - 1) + rows[2]["pickle_out"]) / CHECKPOINT_EVERY
    print(f"after, averaged over {CHECKPOINT_EVERY} calls: {_mb(rows[1]['pickle_in'])} in, {_mb(average)} out "
          f"per call (plain pickle); before: {_mb(rows[0]['pickle_in'])} in, {_mb(rows[0]['pickle_out'])} out")
    engine.close()


def _mb(count: float) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 10_000 else f"{count / 1e3:.1f} kB"


if __name__ == "__main__":
    main()
