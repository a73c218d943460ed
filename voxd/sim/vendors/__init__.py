"""Simulators of the voice-AI vendors' documented protocols (OpenAI Realtime, ElevenLabs
Agents, Deepgram Voice Agent, Vapi's WebSocket transport, voxd's generic WebSocket protocol),
each playing a `Script` (script.py) in its vendor's own words.

They stand in for the vendors where no account is at hand: `voxd demo --provider NAME`, `voxd
echo-upstream --protocol NAME` (the benchmarks) and the conformance suite. The daemon never
uses them."""
