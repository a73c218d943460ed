"""A fake of the one Twilio REST call voxd makes: update a live call (Calls/{Sid}.json)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from quart import request
from quart_trio import QuartTrio


@dataclass
class FakeTwilioRest:
    """Start with `await nursery.start(fake.serve)`; set twilio.api_base_url to `base_url`."""

    account_sid: str
    auth_token: str
    updates: list[dict[str, Any]] = field(default_factory=list)
    updated: trio.Event = field(default_factory=trio.Event)
    base_url: str = ""

    async def serve(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        app = QuartTrio("fake-twilio-rest")

        @app.post("/2010-04-01/Accounts/<account>/Calls/<call_sid>.json")
        async def update_call(account: str, call_sid: str) -> tuple[dict[str, Any], int]:
            expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode())
            if request.headers.get("Authorization") != f"Basic {expected.decode()}":
                return {"code": 20003, "message": "Authenticate", "status": 401}, 401
            form = dict(await request.form)
            self.updates.append({"account": account, "call_sid": call_sid, **form})
            self.updated.set()
            return {"sid": call_sid, "account_sid": account,
                    "status": form.get("Status", "in-progress")}, 200

        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(hypercorn.trio.serve, app, config)
            self.base_url = binds[0]
            task_status.started(self.base_url)
