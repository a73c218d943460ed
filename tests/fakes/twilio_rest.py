"""A fake of the one Twilio REST call voxd makes: update a live call (Calls/{Sid}.json).

It is voxd's simulated REST API (voxd.sim.rest.SimulatedRest) that also answers updates to
calls no simulator is linked to (recorded, 200), as this fake always did. Link a simulated
call to it with `TwilioSimulator(webhook, rest=fake)`: voxd's hang-ups and redirects then
drive that call (stop sent, stream closed, `CallReport.next_twiml`)."""

from __future__ import annotations

from voxd.sim.rest import SimulatedRest


class FakeTwilioRest(SimulatedRest):
    """Start with `await nursery.start(fake.serve)`; set twilio.api_base_url to `base_url`.
    `updates` lists every authenticated update ({"account", "call_sid", **form}), `updated`
    is set by the first; `auth_token` may be set after start."""

    def __init__(self, account_sid: str, auth_token: str) -> None:
        super().__init__(account_sid, auth_token, record_unknown_calls=True)
