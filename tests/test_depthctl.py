"""depthctl as a user drives it, against a real daemon: folders and their trees, video files, what it
counts, what it refuses, and what it says when the daemon goes away; and the client riding out a restart."""

from __future__ import annotations

import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from daemon import DaemonThread, serving, wait_for
from PIL import Image
from scenes import scene

from depthd.config import Limits, ModelSettings, Settings
from depthd_client import DepthClient, messages, sources
from depthd_client.cli import main as depthctl
from depthd_client.progress import Tally
from depthd_client.v1 import depth_pb2 as pb


def settings(tiny_models, listen: str = "127.0.0.1:0") -> Settings:
    model = ModelSettings("rel", str(tiny_models["depth_anything"]), warmup_sizes=((48, 64),))
    return Settings(listen=(listen,), models=(model,), limits=Limits())


@pytest.fixture(scope="module")
def daemon(tiny_models):
    running = serving(settings(tiny_models))
    yield running
    running.stop()


def save(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene(64, 48, seed=seed)).save(path)
    return path


def test_a_folder_tree_keeps_its_relative_paths_and_nothing_is_overwritten_unasked(daemon, tmp_path, capsys):
    for i, name in enumerate(["left/f.jpg", "right/f.jpg", "right/deeper/f.jpg", "top.png"]):
        save(tmp_path / "in" / name, seed=i)
    out = tmp_path / "out"
    argv = ["--target", daemon.address, "stream", str(tmp_path / "in"), "-o", str(out)]

    assert depthctl(argv) == 0  # without -r: the top folder only
    assert [p.relative_to(out).as_posix() for p in sorted(out.rglob("*.npy"))] == ["top.depth.npy"]
    assert depthctl([*argv, "-r", "--overwrite"]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert written == ["left/f.depth.npy", "right/deeper/f.depth.npy", "right/f.depth.npy", "top.depth.npy"]
    maps = [np.load(out / name) for name in written]
    assert not np.array_equal(maps[0], maps[2])  # two f.jpg, two maps

    before = (out / "left/f.depth.npy").read_bytes()
    save(tmp_path / "in" / "left" / "f.jpg", seed=9)
    capsys.readouterr()
    assert depthctl([*argv, "-r"]) == 1
    assert "exists (--overwrite replaces it)" in capsys.readouterr().err
    assert (out / "left/f.depth.npy").read_bytes() == before


def test_estimate_goes_on_past_a_bad_image_and_says_what_failed(daemon, tmp_path, capsys):
    good = [save(tmp_path / "a.png"), save(tmp_path / "c.png", seed=1)]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"
    argv = ["--target", daemon.address, "estimate", str(good[0]), str(bad), str(missing), str(good[1]), "-o", str(out)]
    assert depthctl(argv) == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["a.depth.npy", "c.depth.npy"]
    assert "2 of 4 images failed" in captured.err
    assert re.search(r"bad\.jpg: INVALID_ARGUMENT: .*image", captured.err)
    assert "missing.png: [Errno 2]" in captured.err


@pytest.mark.parametrize(("argv", "says"), [
    (["estimate", "x.png", "--format", "vis"], "--format vis writes files: give -o DIR"),
    (["stream", "dir", "--format", "png16"], "--format png16 writes files: give -o DIR"),
    (["stream", "dir", "--overwrite"], "--overwrite writes files: give -o DIR"),
    (["estimate", "x.png", "-o", "out", "--colormap", "turbo"], "--colormap goes with --format vis$"),
    (["stream", "dir", "-o", "out", "--vis-range", "0,1", "--format", "ply"], "--vis-range goes with --format vis or mp4"),
    (["stream", "dir", "-o", "out", "--format", "vis", "--colormap", "purple"], "argument --colormap: invalid choice"),
    (["estimate", "x.png", "-o", "out", "--format", "mp4"], "argument --format: invalid choice: 'mp4'"),
    (["stream", "/dev/video0", "--format", "mp4"], "--format mp4 of a camera needs -o DIR"),
    (["stream", "dir", "--fps", "0"], "argument --fps: expected a number above 0"),
])
def test_an_option_that_would_do_nothing_is_refused_at_parse_time(argv, says, capsys):
    with pytest.raises(SystemExit) as exited:
        depthctl(["--target", "127.0.0.1:1", *argv])
    assert exited.value.code == 2
    assert re.search(says, capsys.readouterr().err.strip().splitlines()[-1])


def result(dropped: bool = False, failed: bool = False) -> messages.DepthResult:
    error = messages.FrameError(messages.grpc.StatusCode.INVALID_ARGUMENT, "bad") if failed else None
    timing = messages.Timing(1.0, 0.0, 0.0, 0.0, 10.0, 1)
    return messages.DepthResult(0, 0, "m", np.zeros((1, 1)), "metric", 0, 0, timing, dropped=dropped, error=error)


def test_fps_counts_real_results_and_reports_dropped_and_failed_apart():
    """With latest-frame-wins, most frames may come back as dropped: they are not depth."""
    tally = Tally(total=10)
    for r in [result()] * 3 + [result(dropped=True)] * 6 + [result(failed=True)]:
        tally.add(r)
    tally.started -= 2.0
    summary = tally.summary()
    assert re.match(r"10 frames in 2\.\d\d s: 3 depth maps \(1\.\d fps\), p50 10\.0 ms in the daemon, "
                    r"6 dropped, 1 failed$", summary), summary


def test_paced_holds_each_item_to_its_tick_like_a_camera():
    now = [100.0]
    slept = []

    def sleep(seconds):
        slept.append(round(seconds, 6))
        now[0] += seconds

    items = list(sources.paced(range(4), fps=10, clock=lambda: now[0], sleep=sleep))
    assert items == [0, 1, 2, 3] and slept == [0.1, 0.1, 0.1]
    slept.clear()
    late = sources.paced(iter([0, 1, 2]), fps=10, clock=lambda: now[0], sleep=sleep)
    assert next(late) == 0
    now[0] += 0.25  # the consumer took 0.25 s over the first: the next two are due at once
    assert list(late) == [1, 2] and slept == []


def write_video(path: Path, frames: int, fps: int = 10) -> None:
    av = pytest.importorskip("av", reason="PyAV is the video extra: pip install 'depthd-client[video]'")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(scene(64, 48, seed=i), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_a_video_file_gives_a_depth_map_per_frame_and_an_mp4_of_them(daemon, tmp_path, capsys):
    av = pytest.importorskip("av", reason="PyAV is the video extra: pip install 'depthd-client[video]'")
    clip = tmp_path / "clip.mp4"
    write_video(clip, frames=20)
    target = ["--target", daemon.address]
    assert depthctl([*target, "stream", str(clip), "-o", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out" / "clip").glob("*.depth.npy"))) == 20
    assert "20 frames in" in capsys.readouterr().err

    assert depthctl([*target, "stream", str(clip), "--format", "mp4", "--colormap", "turbo"]) == 0
    assert "colour range" in capsys.readouterr().err
    with av.open(str(tmp_path / "clip.depth.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
    assert len(decoded) == 20 and decoded[0].shape == (48, 64, 3) and rate == 10
    assert decoded[0].std() > 1  # a picture, not a blank frame
    assert depthctl([*target, "stream", str(clip), "--format", "mp4"]) == 2  # exists; --overwrite replaces it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_daemon_stopped_mid_stream_leaves_depthctl_saying_what_it_finished(tiny_models, tmp_path, capsys):
    for i in range(200):
        save(tmp_path / "in" / f"{i:03d}.png", seed=i % 7)
    running = serving(settings(tiny_models))
    out = tmp_path / "out"
    exit_code = []
    argv = ["--target", running.address, "stream", str(tmp_path / "in"), "-o", str(out), "--fps", "40"]
    thread = threading.Thread(target=lambda: exit_code.append(depthctl(argv)))
    thread.start()
    wait_for(lambda: out.exists() and len(list(out.iterdir())) >= 3, "three frames written")
    running.stop()
    thread.join(30)
    assert exit_code == [1]
    err = capsys.readouterr().err
    finished = int(re.search(r"(\d+) depth maps", err).group(1))
    assert 3 <= finished < 200 and finished == len(list(out.iterdir()))
    assert re.search(r"stopped after \d+ frames: UNAVAILABLE", err)


def test_reconnect_rides_out_a_daemon_restart_for_calls_and_a_stream(tiny_models):
    port = free_port()
    first = serving(settings(tiny_models, f"127.0.0.1:{port}"))
    frame = scene(64, 48)
    restarted: list[DaemonThread] = []

    def restart() -> None:
        first.stop()
        restarted.append(serving(settings(tiny_models, f"127.0.0.1:{port}")))

    def frames():
        for i in range(10):
            if i == 5:
                restart()
            yield messages.StreamFrame(frame, frame_id=100 + i)

    try:
        with DepthClient(f"127.0.0.1:{port}", reconnect=True, timeout=60) as client:
            assert client.estimate(frame).ok
            results = list(client.stream(frames()))
            assert [r.frame_id for r in results] == [100 + i for i in range(10)]
            assert all(r.ok for r in results[6:])  # the frames after the restart
            lost = [r for r in results if not r.ok]  # those in flight as the first daemon stopped, at most
            assert all(r.error.code.name == "UNAVAILABLE" for r in lost)
            restarted[0].stop()
            threading.Timer(0.5, lambda: restarted.append(serving(settings(tiny_models, f"127.0.0.1:{port}")))).start()
            assert client.estimate(frame).ok  # waits for the daemon that comes back
    finally:
        for running in restarted:
            running.stop()
    with DepthClient(f"127.0.0.1:{port}", timeout=5) as plain:
        with pytest.raises(messages.DepthdError) as failed:
            plain.estimate(frame)
        assert failed.value.code.name == "UNAVAILABLE"  # without reconnect, a daemon that is gone is an error


def test_an_exception_in_the_callers_frames_surfaces_as_itself(daemon):
    def frames():
        yield scene(64, 48)
        raise RuntimeError("camera unplugged")

    got = []
    with DepthClient(daemon.address) as client, pytest.raises(RuntimeError, match="camera unplugged"):
        for r in client.stream(frames()):
            got.append(r)
    assert [r.ok for r in got] == [True]


def test_numpy_frames_are_rgb_unless_told_and_bgr_is_one_word_away(daemon):
    rgb = scene(64, 48)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    with DepthClient(daemon.address) as client:
        reference = client.estimate(rgb).depth
        np.testing.assert_array_equal(client.estimate(bgr, pixel_format="bgr8").depth, reference)
        assert not np.array_equal(client.estimate(bgr).depth, reference)  # read as RGB: a different picture
    request = messages.build_request(bgr, pixel_format="bgr8")
    assert request.image.raw.format == pb.PIXEL_FORMAT_BGR8
