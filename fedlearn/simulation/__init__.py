"""Simulation: many clients on one machine."""

from fedlearn.simulation.engine import BackendName, make_transport, run_simulation
from fedlearn.simulation.inprocess import InProcessTransport
from fedlearn.simulation.pool import PoolTransport
from fedlearn.simulation.ray_transport import RayTransport

__all__ = [
    "BackendName",
    "InProcessTransport",
    "PoolTransport",
    "RayTransport",
    "make_transport",
    "run_simulation",
]
