"""`voxd demo --provider X` against each vendor's simulator (voxd/sim/vendors), and the
simulators as the load test's upstream (`voxd echo-upstream --protocol X`)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.integration.audio import best_alignment, burst, silence
from voxd.audio.g711 import ulaw_to_pcm16
from voxd.sim.demo import PROVIDERS, run_demo
from voxd.sim.load import Processes, run_load

VENDORS = [p for p in PROVIDERS if p != "echo"]


def test_every_simulated_vendor_is_a_demo_provider():
    assert VENDORS == ["websocket", "vapi", "openai", "elevenlabs", "deepgram"]


@pytest.mark.parametrize("audio", ["mulaw", "pcm16"])
@pytest.mark.parametrize("provider", VENDORS)
async def test_the_demo_hears_the_caller_back_through_each_vendor(provider, audio):
    said = burst(0.8, seed=5)
    caller = np.concatenate([silence(0.2), said, silence(1.8)])
    report = await run_demo(audio, sample=caller, provider=provider)
    assert report.errors == [] and report.closed_by == "caller"
    [turn] = report.turns()
    assert turn.latency is not None and turn.latency < 1.0  # said back after a short pause
    heard = np.frombuffer(ulaw_to_pcm16(bytes(report.received_audio)), np.int16)
    _, correlation = best_alignment(said[400:6000], heard)
    assert correlation > 0.9, correlation


def test_voxd_demo_provider_openai_as_a_user_runs_it(tmp_path):
    out = tmp_path / "demo.wav"
    result = subprocess.run([sys.executable, "-m", "voxd", "demo", "--provider", "openai",
                             "--audio", "mulaw", "--record", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "a simulated OpenAI Realtime assistant" in result.stdout
    assert "assistant heard until" in result.stdout
    table = result.stdout.split("latency (voxd)")[1]
    assert "no reply" not in table and table.count(" ms") >= 4  # two turns, both answered
    assert out.is_file() and "Traceback" not in result.stderr


def test_echo_upstream_usage_errors():
    result = subprocess.run([sys.executable, "-m", "voxd", "echo-upstream", "--protocol",
                             "openai", "--listen", "127.0.0.1:9"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("voxd: --listen applies to --protocol websocket only")


@pytest.mark.parametrize("protocol", ["openai", "deepgram"])
async def test_a_vendor_simulator_is_the_load_tests_echo_upstream(protocol):
    processes = Processes("mulaw", workers=1, calls=2, protocol=protocol)
    try:
        await processes.ready()
        report = await run_load(processes.webhook_url, 2, 4.5, auth_token=processes.token)
    finally:
        processes.stop()
    assert report.errors == []
    assert report.sent > 300 and report.lost == 0  # every frame came back through the vendor
    assert report.cpu_cores is not None


async def test_the_turn_table_shows_the_assistants_own_stage_figures(start_voxd, nursery):
    """Deepgram reports each turn's stages (AgentStartedSpeaking): voxd passes them on in the
    answer's mark, and `voxd call`'s turn table shows them next to the latencies."""
    from voxd.audio.g711 import pcm16_to_ulaw
    from voxd.sim.caller import TwilioSimulator
    from voxd.sim.vendors.deepgram import FakeDeepgram
    from voxd.sim.vendors.script import Script

    fake = FakeDeepgram()
    fake.audio_format = "mulaw"
    fake.script = Script(echo=False, reply=pcm16_to_ulaw(burst(0.6, seed=9).tobytes()),
                         reply_at=1.2)
    await nursery.start(fake.serve)
    voxd = await start_voxd(secrets=fake.secrets, assistant={"provider": "deepgram",
                                                             "audio": "mulaw"},
                            **fake.sections())
    caller = np.concatenate([silence(0.2), burst(0.6, seed=5), silence(2.2)])
    report = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(caller, 3.0)
    assert report.stages == {1: {"total": 0.9, "first_token": 0.4, "first_audio": 0.25}}
    table = report.render()
    assert "assistant stages" in table
    assert "total 900 ms, first_token 400 ms, first_audio 250 ms" in table
