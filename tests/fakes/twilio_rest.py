"""A fake of Twilio's Calls API as voxd uses it: update a live call (Calls/{Sid}.json), and
create and fetch outbound calls (Calls.json, Calls/{Sid}.json).

It is voxd's simulated REST API (voxd.sim.rest.SimulatedRest) that also answers updates to
calls no simulator is linked to (recorded, 200), as this fake always did. Link a simulated
call to it with `TwilioSimulator(webhook, rest=fake)`: voxd's hang-ups and redirects then
drive that call (stop sent, stream closed, `CallReport.next_twiml`). Outbound calls voxd
creates reach `callees[To]` or `default_callee` (voxd.sim.callee.Callee); follow them in
`fake.outbound[CallSid]` and `await fake.wait_over(CallSid)`."""

from __future__ import annotations

from typing import Any

from voxd.sim.rest import SimulatedRest


class FakeTwilioRest(SimulatedRest):
    """Start with `await nursery.start(fake.serve)`; set twilio.api_base_url to `base_url`.
    `updates` lists every authenticated update ({"account", "call_sid", **form}), `updated`
    is set by the first; `created` lists the accepted creates, `placed` is set by the first;
    `auth_token` may be set after start. Other keywords (`callees`, `default_callee`,
    `ring_timeout_scale`) go to SimulatedRest."""

    def __init__(self, account_sid: str, auth_token: str, **options: Any) -> None:
        super().__init__(account_sid, auth_token, record_unknown_calls=True, **options)
