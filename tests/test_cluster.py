"""The render server in front of a Ray cluster (``--cluster``): a local test cluster of three
nodes with one logical GPU each and the preview backend on their CPUs. A 200-frame shot from
three clients at once, then with a worker killed in the middle of it: every frame answered
exactly once and byte for byte the frame a plain server renders; a node that joins is used
without a restart."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # Ray on 127.0.0.1 only

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from portrait_rig.client import Client, Pong  # noqa: E402
from portrait_rig.params import RigParams  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow

FRAMES, SIZE, CLIENTS = 200, 48, 3
NODE = {"object_store_memory": 80 << 20}


def shot_params(i: int) -> dict:
    t = i / (FRAMES - 1)
    return RigParams.from_dict({"pose": {"global": [0.1 * np.sin(9 * t), 0.7 * np.sin(5 * t), 0],
                                         "jaw": [0.25 * t, 0, 0]},
                                "expression": [2 * t - 1, np.cos(7 * t)]}).to_dict()


def shot(i: int) -> dict:
    return {"id": "Take/Cam", "seed": 5, "frame": i + 1}


def render_frames(client, indices, on_reply, window: int = 32) -> None:
    """Render ``indices`` with at most ``window`` requests queued (the server's limit per
    connection is 64); ``on_reply(index, frame)`` for every reply, as it comes."""
    waiting, in_flight = list(indices), {}
    while waiting or in_flight:
        while waiting and len(in_flight) < window:
            i = waiting.pop(0)
            in_flight[client.send_render(shot_params(i), SIZE, SIZE, shot=shot(i))] = i
        reply = client.receive()
        assert reply.id in in_flight, f"reply {reply.id!r} to no request waiting for one"
        on_reply(in_flight.pop(reply.id), reply)


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False, **NODE})
    for _ in range(3):
        cluster.add_node(num_cpus=1, num_gpus=1, **NODE)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def front(cluster):
    with ServerProcess("--model", "demo", "--cluster", cluster.address,
                       "--option", "preview.num_gpus=1", "--quiet") as server:
        wait_for_workers(server, 3)
        yield server


@pytest.fixture(scope="module")
def reference():
    """Every frame of the shot from a plain server."""
    frames = {}
    with ServerProcess("--model", "demo", "--backend", "preview", "--quiet") as server:
        with Client(server.host, server.port, timeout=60) as client:
            render_frames(client, range(FRAMES),
                          lambda i, reply: frames.__setitem__(i, bytes(reply.pixels)))
    return frames


def workers(server) -> dict:
    with Client(server.host, server.port, timeout=30) as client:
        return client.hello.get("workers", {})


def wait_for_workers(server, count: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while workers(server).get("preview", 0) != count:
        assert time.monotonic() < deadline, f"{count} workers not up:\n{server.log()[-3000:]}"
        time.sleep(0.5)


def render_shot(server, on_progress=None) -> list[dict]:
    """The shot's frames split over CLIENTS connections sending at once; per client, the
    replies by frame index (a frame answered twice fails)."""
    results = [dict() for _ in range(CLIENTS)]
    errors: list = []
    received = [0]
    lock = threading.Lock()

    def client_thread(k: int) -> None:
        try:
            with Client(server.host, server.port, timeout=120) as client:
                def keep(index, reply):
                    results[k][index] = bytes(reply.pixels)
                    with lock:
                        received[0] += 1
                        if on_progress:
                            on_progress(received[0])
                render_frames(client, range(k, FRAMES, CLIENTS), keep)
                client.send({"type": "ping", "id": "end"})      # nothing else may come first
                assert isinstance(client.receive(), Pong)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    return results


def check_complete_and_identical(results, reference) -> None:
    merged = {}
    for part in results:
        assert not merged.keys() & part.keys()
        merged.update(part)
    assert sorted(merged) == list(range(FRAMES))
    different = [i for i in range(FRAMES) if merged[i] != reference[i]]
    assert not different, f"frames {different[:10]} differ from the plain server's"


def test_hello_says_how_many_workers_are_up(front):
    with Client(front.host, front.port, timeout=30) as client:
        assert client.hello["workers"] == {"preview": 3}
        assert [b["name"] for b in client.hello["backends"]] == ["preview"]
    assert len(re.findall(r"preview worker up \(pid \d+", front.log())) >= 3


def test_a_shot_from_three_clients_is_rendered_once_and_as_a_plain_server(front, reference):
    check_complete_and_identical(render_shot(front), reference)
    assert "died" not in front.log()


def test_a_worker_killed_mid_shot_loses_nothing(front, reference):
    pids = [int(p) for p in re.findall(r"preview worker up \(pid (\d+)", front.log())]
    victim, killed = pids[-1], threading.Event()

    def kill_once(received: int) -> None:
        if received >= FRAMES // 3 and not killed.is_set():
            killed.set()
            os.kill(victim, signal.SIGKILL)

    results = render_shot(front, kill_once)
    assert killed.is_set()
    check_complete_and_identical(results, reference)
    assert re.search(rf"preview worker pid {victim} on node \w+ died", front.log())
    wait_for_workers(front, 3)                         # replaced where its GPU came free


def test_a_node_that_joins_is_used_without_a_restart(cluster, front):
    node = cluster.add_node(num_cpus=1, num_gpus=1, **NODE)
    try:
        wait_for_workers(front, 4)
    finally:
        cluster.remove_node(node)
    wait_for_workers(front, 3)
