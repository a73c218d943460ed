"""deploy/nginx/voxd.conf, run for real on loopback: TLS at nginx, two voxd instances behind
it, signed calls placed through the proxy's public https/wss URLs."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import trio

from tests.integration.audio import burst, silence
from tests.integration.conftest import make_settings
from tests.integration.system_tools import missing_after_apt
from tests.integration.test_cli import free_port
from voxd.server import open_listener, serve
from voxd.sim.caller import TwilioSimulator

CONF = Path(__file__).parents[2] / "deploy" / "nginx" / "voxd.conf"


@pytest.fixture
def proxied(tmp_path, start_voxd):
    """nginx on a loopback TLS port in front of the voxd instances the test starts."""
    missing = missing_after_apt(("nginx", "openssl"), ("nginx-light", "openssl"))
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed and apt-get could not (as root: "
                    "apt-get install nginx-light openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port = free_port()
    state = {}

    def start_nginx(backends: list[int]) -> str:
        conf = CONF.read_text()
        conf = conf.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
        conf = conf.replace("server_name voice.example.com;", "server_name localhost;")
        conf = conf.replace("/etc/ssl/certs/voice.example.com.pem", str(cert))
        conf = conf.replace("/etc/ssl/private/voice.example.com.key", str(key))
        conf = conf.replace("    server 127.0.0.1:3001 max_fails=0;\n"
                            "    server 127.0.0.1:3002 max_fails=0;\n",
                            "".join(f"    server 127.0.0.1:{b} max_fails=0;\n"
                                    for b in backends))
        main = tmp_path / "nginx.conf"
        main.write_text(f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/err.log;\n"
                        "events {}\nhttp {\naccess_log off;\n" + conf + "\n}\n")
        state["proc"] = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(main)],
                                         stderr=subprocess.PIPE)
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        return f"https://localhost:{port}"

    os.environ["SSL_CERT_FILE"] = str(cert)  # the simulator trusts our test CA, like Twilio
    yield start_nginx
    os.environ.pop("SSL_CERT_FILE", None)
    if "proc" in state:
        state["proc"].terminate()
        state["proc"].wait(5)


async def test_signed_calls_through_nginx_reach_both_instances(proxied, nursery):
    """public_url is nginx's https origin on both instances; Twilio (the simulator) signs the
    webhook and the wss upgrade for that origin; both instances take calls."""
    backends = [free_port(), free_port()]
    public = proxied(backends)
    token = "shared-auth-token"
    served = []
    for backend in backends:
        # every instance shares the stream secret, or one rejects the other's stream tokens
        settings = make_settings(public, token, {"stream_secret": "shared-stream-secret"})
        runtime = await nursery.start(serve, settings, open_listener(f"127.0.0.1:{backend}"))
        count = {"calls": 0}
        runtime.live.on_change = lambda live, count=count: count.update(
            calls=count["calls"] + (1 if live.sessions else 0))
        served.append(count)
    reports = []

    async def call(i: int) -> None:
        caller = np.concatenate([burst(0.4, seed=i), silence(1.2)])
        sim = TwilioSimulator(public + "/twilio/voice", auth_token=token)
        reports.append(await sim.call(caller))

    async with trio.open_nursery() as calls:
        for i in range(4):
            calls.start_soon(call, i)
            await trio.sleep(0.1)
    assert len(reports) == 4
    for report in reports:
        assert report.errors == [] and report.closed_by == "caller"
        assert report.turns()[0].latency is not None
    assert all(count["calls"] > 0 for count in served), served  # both instances took calls
