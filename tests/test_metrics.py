"""Prometheus metrics (`metrics_listen`): a real daemon's /metrics, scraped over loopback after
frames went through the real client; the setting's validation; off unless asked for."""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import grpc
import pytest
import yaml
from daemon import DaemonThread, GatedPool, gated_daemon, queue, wait_for
from prometheus_client.parser import text_string_to_metric_families
from scenes import scene

import depthd
from depthd.config import ConfigError, ModelSettings, Settings, load_settings
from depthd.ops.cli import main as depthd_main
from depthd.ops.metrics import Metrics
from depthd.server.servicer import Unobserved
from depthd_client import DepthClient, DepthdError, StreamFrame

MODEL = "rel"
LATENCIES = ("depthd_frame_queue_seconds", "depthd_frame_inference_seconds", "depthd_frame_latency_seconds")

Samples = dict[tuple[str, frozenset], float]
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Loopback, whatever http_proxy says."""


def settings_for(tiny_models, metrics_listen: str | None = "127.0.0.1:0") -> Settings:
    model = ModelSettings(MODEL, str(tiny_models["depth_anything"]), warmup_sizes=((48, 64),), max_batch=4)
    return Settings(listen=("127.0.0.1:0",), models=(model,), metrics_listen=metrics_listen)


@pytest.fixture(scope="module")
def daemon(tiny_models):
    yield from gated_daemon(settings_for(tiny_models), gated=(MODEL,))


@pytest.fixture
def client(daemon):
    with DepthClient(daemon.address, timeout=30) as c:
        yield c


def config_with(folder: Path, metrics_listen: object) -> Path:
    path = folder / "depthd.yaml"
    path.write_text(yaml.safe_dump({"metrics_listen": metrics_listen, "models": [{"name": "a", "source": "b"}]}))
    return path


def scrape(url: str) -> Samples:
    """Every sample of the endpoint, by name and labels, as Prometheus would parse it."""
    with DIRECT.open(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; KeyError when the endpoint has no such series."""
    return samples[(name, frozenset(labels.items()))]


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much a series grew between two scrapes (a series not yet there counted 0 before)."""
    key = (name, frozenset(labels.items()))
    return after[key] - before.get(key, 0.0)


def grown(before: Samples, after: Samples, name: str) -> dict[frozenset, float]:
    """Every series of `name` that grew, by its labels."""
    return {labels: v - before.get((n, labels), 0.0) for (n, labels), v in after.items()
            if n == name and v != before.get((n, labels), 0.0)}


def test_frames_answered_and_refused_with_their_latencies_and_batches(daemon, client):
    url = daemon.daemon.metrics.url
    before = scrape(url)
    unary = [client.estimate(scene(64, 48, seed=seed)) for seed in range(3)]
    with pytest.raises(DepthdError) as caught:
        client.estimate(b"garbage, not an image")
    streamed = list(client.stream([scene(64, 48, seed=3), scene(48, 64, seed=4)]))
    after = scrape(url)

    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    answered = len(unary) + len(streamed)
    assert all(r.ok for r in unary + streamed) and answered == 5
    assert delta(before, after, "depthd_frames_answered_total", model=MODEL) == answered
    assert grown(before, after, "depthd_frames_errored_total") == {
        frozenset({"model": MODEL, "code": "INVALID_ARGUMENT"}.items()): 1}
    for name in LATENCIES:
        assert delta(before, after, f"{name}_count", model=MODEL) == answered, name
        assert delta(before, after, f"{name}_bucket", model=MODEL, le="+Inf") == answered, name
        assert delta(before, after, f"{name}_sum", model=MODEL) > 0, name
    seconds = {name: delta(before, after, f"{name}_sum", model=MODEL) for name in LATENCIES}
    # a frame's whole way holds its wait for the model and its batch's forward pass
    assert seconds["depthd_frame_latency_seconds"] >= (
        seconds["depthd_frame_queue_seconds"] + seconds["depthd_frame_inference_seconds"]) * 0.999
    # the garbage frame never reached the model: every frame forwarded was answered
    passes = delta(before, after, "depthd_batch_size_count", model=MODEL)
    assert delta(before, after, "depthd_batch_size_sum", model=MODEL) == answered
    assert 1 <= passes <= answered
    assert delta(before, after, "depthd_batch_size_bucket", model=MODEL, le="+Inf") == passes
    assert delta(before, after, "depthd_batch_size_bucket", model=MODEL, le="256.0") == passes


def test_a_frame_refused_in_a_stream_and_one_for_a_model_not_served(daemon, client):
    url = daemon.daemon.metrics.url
    before = scrape(url)
    results = list(client.stream([StreamFrame(b"garbage"), scene(64, 48)]))
    with pytest.raises(DepthdError) as caught:
        client.estimate(scene(64, 48), model="made-up")
    after = scrape(url)

    assert [r.ok for r in results] == [False, True] and caught.value.code is grpc.StatusCode.NOT_FOUND
    assert grown(before, after, "depthd_frames_errored_total") == {
        frozenset({"model": MODEL, "code": "INVALID_ARGUMENT"}.items()): 1,
        frozenset({"model": "", "code": "NOT_FOUND"}.items()): 1,  # a name a client made up is no series of its own
    }
    assert delta(before, after, "depthd_frames_answered_total", model=MODEL) == 1


def test_frames_that_share_a_forward_pass_are_one_batch(daemon, client):
    url = daemon.daemon.metrics.url
    gate = daemon.gates[MODEL]
    before = scrape(url)
    gate.shut()

    def camera():
        yield scene(64, 48, seed=0)
        assert gate.entered.wait(30)
        yield scene(64, 48, seed=1)
        yield scene(64, 48, seed=2)
        wait_for(lambda: queue(daemon, MODEL).queue_ready == 2, "two frames ready for the next pass")
        gate.release()

    results = list(client.stream(camera()))
    after = scrape(url)

    assert all(r.ok for r in results) and [r.timing.batch_size for r in results] == [1, 2, 2]
    assert delta(before, after, "depthd_batch_size_count", model=MODEL) == 2
    assert delta(before, after, "depthd_batch_size_sum", model=MODEL) == 3
    assert delta(before, after, "depthd_batch_size_bucket", model=MODEL, le="1.0") == 1
    assert delta(before, after, "depthd_batch_size_bucket", model=MODEL, le="2.0") == 2
    assert delta(before, after, "depthd_frames_answered_total", model=MODEL) == 3


def test_a_dropped_frame_is_counted_dropped_and_not_answered(daemon, client):
    url = daemon.daemon.metrics.url
    gate = daemon.gates[MODEL]
    before = scrape(url)
    waiting: list[Samples] = []
    gate.shut()

    def camera():
        yield scene(64, 48, seed=0)
        assert gate.entered.wait(30)
        yield scene(64, 48, seed=1)  # waits for the model
        yield scene(64, 48, seed=2)  # replaces it
        wait_for(lambda: delta(before, scrape(url), "depthd_frames_dropped_total", model=MODEL) == 1, "the drop")
        waiting.append(scrape(url))
        gate.release()

    results = list(client.stream(camera(), latest_frame_wins=True))
    after = scrape(url)

    assert [r.dropped for r in results] == [False, True, False]
    assert value(waiting[0], "depthd_queue_depth", model=MODEL) == 1
    assert value(after, "depthd_queue_depth", model=MODEL) == 0
    assert delta(before, after, "depthd_frames_dropped_total", model=MODEL) == 1
    assert delta(before, after, "depthd_frames_answered_total", model=MODEL) == 2
    assert delta(before, after, "depthd_frame_latency_seconds_count", model=MODEL) == 2


def test_readiness_build_info_and_process_metrics(daemon):
    samples = scrape(daemon.daemon.metrics.url)

    assert value(samples, "depthd_model_ready", model=MODEL) == 1
    assert value(samples, "depthd_held_bytes", model=MODEL) >= 0
    [build] = [dict(labels) for name, labels in samples if name == "depthd_build_info"]
    assert build["version"] == depthd.__version__ and build["torch"] == metadata.version("torch")
    assert build["transformers"] == metadata.version("transformers")
    assert value(samples, "depthd_build_info", **build) == 1
    assert value(samples, "process_resident_memory_bytes") > 0
    assert value(samples, "process_cpu_seconds_total") > 0
    assert any(name == "python_info" for name, _ in samples)


def test_before_the_models_are_ready_and_after_the_daemon_stops(tiny_models, caplog):
    settings = settings_for(tiny_models)
    pool = GatedPool(settings)
    caplog.set_level(logging.INFO, logger="depthd.ops.metrics")
    running = DaemonThread(settings, pool)
    try:
        url = running.daemon.metrics.url
        assert url.startswith("http://127.0.0.1:") and not url.startswith("http://127.0.0.1:0/")
        assert f"metrics on {url}" in caplog.messages
        samples = scrape(url)
        assert value(samples, "depthd_model_ready", model=MODEL) == 0
        assert value(samples, "depthd_frames_answered_total", model=MODEL) == 0
        assert value(samples, "depthd_batch_size_count", model=MODEL) == 0
    finally:
        assert running.stop() == 0
        pool.gate.set()

    with pytest.raises(urllib.error.URLError):
        scrape(url)
    port = int(url.split(":")[2].split("/")[0])
    with socket.create_server(("127.0.0.1", port)):
        pass  # the port was closed, not only left unserved


def test_off_unless_asked_for(tiny_models, tmp_path):
    config = tmp_path / "depthd.yaml"
    config.write_text("models: [{name: a, source: b}]\n")
    assert Settings().metrics_listen is None and load_settings(config, {}, {}).metrics_listen is None
    assert load_settings(config, {}, {"metrics_listen": ""}).metrics_listen is None

    settings = settings_for(tiny_models, metrics_listen=None)
    pool = GatedPool(settings)
    running = DaemonThread(settings, pool)
    try:
        assert running.daemon.metrics is None
        assert isinstance(running.daemon.server.servicer.frames, Unobserved)
    finally:
        assert running.stop() == 0
        pool.gate.set()


def test_a_port_in_use_fails_start_up_saying_so(tiny_models):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        settings = settings_for(tiny_models, metrics_listen=address)
        with pytest.raises(RuntimeError, match=rf"metrics_listen {address}: cannot listen there \(Address already in use\)"):
            DaemonThread(settings, GatedPool(settings))


@pytest.mark.parametrize(
    "given, expected",
    [("127.0.0.1:9464", "127.0.0.1:9464"), ("9464", "127.0.0.1:9464"), (9464, "127.0.0.1:9464"),
     ("[::1]:9464", "[::1]:9464"), ("0.0.0.0:0", "0.0.0.0:0"), ("", None)],
)
def test_metrics_listen_values(tmp_path, given, expected):
    assert load_settings(config_with(tmp_path, given), {}, {}).metrics_listen == expected


@pytest.mark.parametrize("given", ["localhost", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:http", ":9464",
                                   "::1:9464", [1, 2], True])
def test_a_bad_metrics_listen_is_refused_naming_the_key(tmp_path, given):
    with pytest.raises(ConfigError, match=r"^metrics_listen \(from .*depthd.yaml\): "):
        load_settings(config_with(tmp_path, given), {}, {})
    with pytest.raises(ConfigError, match=r"^metrics_listen \(from environment\): must be host:port"):
        load_settings(None, {"DEPTHD_MODELS": "a=b", "DEPTHD_METRICS_LISTEN": "127.0.0.1:65536"}, {})


def test_the_flag(capsys):
    assert depthd_main(["serve", "--model", "a=b", "--metrics-listen", "nowhere"]) == 2
    assert "metrics_listen (from flags): must be host:port (port 0-65535), got 'nowhere'" in capsys.readouterr().err


def test_an_ipv6_host(tiny_models):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    metrics = Metrics(GatedPool(settings_for(tiny_models)))
    url = metrics.start("[::1]:0")
    try:
        assert url.startswith("http://[::1]:")
        assert value(scrape(url), "depthd_model_ready", model=MODEL) == 0
    finally:
        metrics.stop()
