"""The commands a user types: `depthd serve` as a real process, `depthctl`, and the stub generator."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from daemon import serving
from PIL import Image
from scenes import scene

from depthd.config import Limits, ModelSettings, Settings
from depthd_client import DepthClient
from depthd_client.cli import main as depthctl

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_the_proto():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate-protos"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_depthd_serve_process_with_a_config_the_demo_and_json_logs(tiny_models, tmp_path):
    socket = tmp_path / "depthd.sock"
    config = tmp_path / "depthd.yaml"
    config.write_text(
        f"listen: ['unix:{socket}']\n"
        "log_format: json\n"
        f"models:\n  - name: glpn\n    source: {tiny_models['glpn']}\n    warmup_sizes: [[64, 64]]\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DEPTHD_DEMO": "true"}
    env.pop("OMP_WAIT_POLICY", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "depthd", "serve", "--config", str(config)],
        env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        with DepthClient(f"unix://{socket}") as client:
            client.wait_until_serving(120)
            models = {m.name: m for m in client.models()}
            assert list(models) == ["glpn", "demo"]
            assert models["glpn"].is_default and models["glpn"].kind == "metric"
            assert models["demo"].demo and "random weights" in models["demo"].note
            assert client.estimate(scene(64, 48), model="demo").kind == "relative_disparity"
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    events = [json.loads(line) for line in process.stderr.read().splitlines()]
    messages = [e["msg"] for e in events]
    assert any(m.startswith("listening on unix:") for m in messages)
    assert any("DEMO model=demo has random weights" in m for m in messages)
    assert any("OMP_WAIT_POLICY=PASSIVE" in m for m in messages), "idle OpenMP threads must sleep, not spin"
    assert messages[-1] == "stopped"


def test_depthd_serve_exits_with_the_reason_a_model_cannot_load(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "depthd", "serve", "--model", f"cam={tmp_path / 'missing'}",
         "--listen", f"unix:{tmp_path / 's.sock'}"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert f"cannot load model 'cam' from '{tmp_path / 'missing'}': no such folder" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def daemon(tiny_models):
    settings = Settings(
        listen=("127.0.0.1:0",),
        models=(
            ModelSettings("metric", str(tiny_models["depth_anything_metric"]), warmup_sizes=((48, 64),)),
            ModelSettings("rel", str(tiny_models["depth_anything"]), warmup_sizes=((48, 64),)),
        ),
        limits=Limits(),
    )
    running = serving(settings)
    yield running
    running.stop()


def test_depthctl_estimate_writes_files_that_load_back(daemon, tmp_path, capsys):
    image = tmp_path / "frame.png"
    Image.fromarray(scene(96, 64)).save(image)
    out = tmp_path / "out"
    target = ["--target", daemon.address]
    for form in ("npy", "png16", "vis"):
        assert depthctl([*target, "estimate", str(image), "-o", str(out), "--format", form]) == 0
    assert "frame.png: metric, 96x64" in capsys.readouterr().out

    with DepthClient(daemon.address) as client:
        metres = client.estimate(image).depth
        millimetres = client.estimate(image, encoding="uint16_mm").depth
        picture = client.estimate(image, visualization=True).visualization_png
    np.testing.assert_array_equal(np.load(out / "frame.depth.npy"), metres)
    png16 = Image.open(out / "frame.depth16.png")
    assert png16.mode.startswith("I;16") or png16.mode == "I"
    np.testing.assert_array_equal(np.array(png16).astype(np.uint16), millimetres)
    np.testing.assert_array_equal(np.array(Image.open(out / "frame.vis.png")), np.array(Image.open(io.BytesIO(picture))))


def test_depthctl_stream_models_and_health(daemon, tmp_path, capsys):
    for i in range(5):
        Image.fromarray(scene(64, 48, seed=i)).save(tmp_path / f"{i:03d}.jpg")
    target = ["--target", daemon.address]
    assert depthctl([*target, "stream", str(tmp_path), "--model", "rel", "-o", str(tmp_path / "out")]) == 0
    assert "5 frames in" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{i:03d}.depth.npy" for i in range(5)]

    assert depthctl([*target, "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t")[:3] == ["metric", "depth_anything", "metric"] and "default,ready" in lines[0]
    assert depthctl([*target, "health", "--model", "rel"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


FAKE_GRPCURL = '''#!{python}
"""grpcurl's part of the README's example, for a machine without grpcurl: the flags it uses, the JSON
request from standard input, the message size limit, the call, and the JSON reply."""
import sys
import grpc
from google.protobuf import json_format
from depthd_client.v1 import depth_pb2 as pb, depth_pb2_grpc

args = sys.argv[1:]
assert args[:5] == ["-plaintext", "-max-msg-sz", args[2], "-d", "@"], args
limit, address, method = int(args[2]), args[5], args[6]
assert method == "depthd.v1.DepthEstimator/Estimate", method
request = json_format.Parse(sys.stdin.read(), pb.EstimateRequest())
options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
reply = depth_pb2_grpc.DepthEstimatorStub(grpc.insecure_channel(address, options=options)).Estimate(request)
print(json_format.MessageToJson(reply))
'''


def test_the_readmes_grpcurl_example_sends_a_2_mb_photo(daemon, tmp_path):
    readme = (ROOT / "README.md").read_text()
    [example] = [block for block in readme.split("```sh\n")[1:] if "grpcurl" in block.split("```")[0]]
    example = example.split("```")[0].replace("127.0.0.1:50051", daemon.address)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.jpg", quality=90)
    assert 1.5e6 < (tmp_path / "photo.jpg").stat().st_size < 3e6
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "grpcurl").write_text(FAKE_GRPCURL.replace("{python}", sys.executable))
    (bin_dir / "grpcurl").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    depth = json.loads(done.stdout)["depth"]
    assert (depth["width"], depth["height"], depth["encoding"]) == (1600, 1200, "DEPTH_ENCODING_FLOAT16")
