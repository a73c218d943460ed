"""Moved to voxd/sim/vendors/vapi.py (the vendor simulators ship with voxd for `voxd demo
--provider` and the benchmarks); re-exported here so the tests' imports keep working."""

from voxd.sim.vendors.vapi import *  # noqa: F403
from voxd.sim.vendors.vapi import (
    __all__,  # noqa: F401
    _validate,  # noqa: F401 (tests/fakes/chaos.py uses it)
)
