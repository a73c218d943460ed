"""Moved to voxd/sim/vendors/proxy.py (the vendor simulators ship with voxd for `voxd demo
--provider` and the benchmarks); re-exported here so the tests' imports keep working."""

from voxd.sim.vendors.proxy import *  # noqa: F403
from voxd.sim.vendors.proxy import __all__  # noqa: F401
