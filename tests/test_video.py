"""Reading and writing video files (sv2v_core/video.py)."""

import os
from fractions import Fraction

import av
import numpy as np
import pytest

from sv2v_core.video import VideoError, VideoReader, VideoWriter, probe_video, read_video, write_video


def frames_of(n, height=48, width=64, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return [np.roll(base, 2 * i, axis=1) for i in range(n)]


def encode(path, frames, codec, rate, pix_fmt, options=None, rotation=None):
    """Write a file with PyAV directly (independent of VideoWriter)."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    "ext, fps",
    [(".mp4", Fraction(30000, 1001)), (".webm", Fraction(24)), (".gif", Fraction(10)), (".mkv", Fraction(25))],
)
def test_round_trip_keeps_count_rate_and_size(tmp_path, ext, fps):
    frames = frames_of(7)
    path = write_video(tmp_path / f"out{ext}", frames, fps)
    assert leftovers(tmp_path) == [f"out{ext}"]  # no temporary file left
    decoded, info = read_video(path)
    decoded = list(decoded)
    assert len(decoded) == 7
    assert info.fps == fps
    assert (info.width, info.height) == (64, 48)
    assert decoded[3].dtype == np.uint8 and decoded[3].shape == (48, 64, 3)
    assert abs(info.frame_count - 7) <= 1


def test_mp4_fps_and_frame_count_are_exact(tmp_path):
    path = write_video(tmp_path / "a.mp4", frames_of(5), Fraction(30000, 1001))
    info = probe_video(path)
    assert info.fps == Fraction(30000, 1001)
    assert info.frame_count == 5 and not info.frame_count_estimated
    assert info.codec == "h264"


def test_odd_size_is_padded_to_even(tmp_path):
    frames = frames_of(3, height=33, width=47)
    with VideoWriter(tmp_path / "odd.mp4", 12) as writer:
        for frame in frames:
            writer.write(frame)
    assert writer.size == (48, 34)
    decoded, info = read_video(tmp_path / "odd.mp4")
    first = next(decoded)
    assert first.shape == (34, 48, 3)


def test_reads_mjpeg_avi_and_applies_rotation(tmp_path):
    image = np.zeros((32, 48, 3), np.uint8)
    image[:4, :4] = 255  # a white square in the top-left corner
    encode(tmp_path / "m.avi", [image] * 4, "mjpeg", 12, "yuvj420p")
    frames, info = read_video(tmp_path / "m.avi")
    assert len(list(frames)) == 4 and info.fps == 12 and info.codec == "mjpeg"

    encode(tmp_path / "r.mp4", [image] * 2, "libx264", 10, "yuv420p", rotation=90)
    frames, info = read_video(tmp_path / "r.mp4")
    upright = next(frames)
    assert (info.width, info.height) == (32, 48) and upright.shape == (48, 32, 3)
    # 90 degrees counter-clockwise: the top-left corner moves to bottom-left
    assert upright[-2, 1, 0] > 200 and upright[1, 1, 0] < 50


def test_missing_folder_text_and_truncated_files(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoError, match="folder"):
        read_video(tmp_path)
    (tmp_path / "text.mp4").write_text("this is not a video")
    with pytest.raises(VideoError, match="not a readable video"):
        read_video(tmp_path / "text.mp4")
    data = write_video(tmp_path / "good.mp4", frames_of(10), 10).read_bytes()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])  # index at the end: unreadable
    with pytest.raises(VideoError):
        read_video(tmp_path / "half.mp4")


def test_truncated_stream_yields_good_frames_then_fails(tmp_path):
    # index at the front (faststart): the cut only shows when the frames run out
    ys, xs = np.mgrid[0:48, 0:64]
    smooth = [np.stack([(128 + 100 * np.sin((xs + 3 * i) / 5 + c) * np.cos(ys / 7)).astype(np.uint8)
                        for c in range(3)], axis=-1) for i in range(30)]
    encode(tmp_path / "fs.mp4", smooth, "libx264", 30, "yuv420p", options={"movflags": "+faststart"})
    data = (tmp_path / "fs.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[:-150])  # drops the last several frames
    frames, info = read_video(tmp_path / "cut.mp4")
    assert info.frame_count == 30
    seen = 0
    with pytest.raises(VideoError, match="truncated|damaged"):
        for _ in frames:
            seen += 1
    assert 0 < seen < 30


def test_unwritable_destinations(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        VideoWriter(tmp_path / "missing" / "out.mp4", 10)
    with pytest.raises(VideoError, match="extension"):
        VideoWriter(tmp_path / "out.txt", 10)
    with pytest.raises(VideoError, match="folder"):
        (tmp_path / "dir.mp4").mkdir()
        VideoWriter(tmp_path / "dir.mp4", 10)
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(VideoError, match="cannot write"):
            VideoWriter(locked / "out.mp4", 10)


def test_failure_inside_block_leaves_nothing(tmp_path):
    target = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(target, 10) as writer:
            writer.write(frames_of(1)[0])
            raise KeyboardInterrupt
    assert leftovers(tmp_path) == []

    with pytest.raises(VideoError, match="no frames"):
        write_video(target, [], 10)
    assert leftovers(tmp_path) == []

    with pytest.raises(VideoError, match="is 32x32"):
        write_video(target, [frames_of(1)[0], np.zeros((32, 32, 3), np.uint8)], 10)
    assert leftovers(tmp_path) == []


def test_existing_output_is_replaced_only_on_success(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with VideoWriter(target, 10) as writer:
            writer.write(frames_of(1)[0])
            raise RuntimeError("stop")
    assert target.read_bytes() == b"old"
    write_video(target, frames_of(2), 10)
    assert len(list(read_video(target)[0])) == 2


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_closing_a_reader_ends_its_decoder_threads_at_once(tmp_path, monkeypatch):
    """Not at a later garbage collection: a process forked before it would inherit the threads'
    locks, and its own collection would hang freeing them (a ZeroGPU worker is such a fork)."""
    import gc

    source = write_video(tmp_path / "clip.mp4", frames_of(6, 128, 128), 10)
    monkeypatch.setattr(gc, "isenabled", gc.isenabled)  # restore whatever the suite had
    gc.disable()
    try:
        before = native_threads()
        reader = VideoReader(source)
        assert native_threads() > before, "the threaded decoder started no thread: nothing to test"
        reader.close()
        assert native_threads() == before
        frames, _ = read_video(source)  # partly read, then the iterator closed
        next(frames)
        frames.close()
        assert native_threads() == before
    finally:
        gc.enable()


def test_a_process_forked_after_probing_a_video_collects_its_garbage(tmp_path):
    import multiprocessing

    source = write_video(tmp_path / "clip.mp4", frames_of(6, 128, 128), 10)
    probe_video(source)
    read_video(source)  # opened and dropped unread
    import gc
    child = multiprocessing.get_context("fork").Process(target=gc.collect)
    child.start()
    child.join(timeout=30)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0, "the forked child hung collecting the parent's video objects"
