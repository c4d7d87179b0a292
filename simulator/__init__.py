"""A simulated Azure estate over real HTTPS, for rehearsals and end-to-end tests (never deployed).

``Simulator(Estate.default()).start()`` serves ARM compute (VM models, instance views, paged lists,
Run Command) and an App Service managed-identity token endpoint on loopback; Windows guests answer
the guest scripts as Windows would (docs/guest-contract.md). Guide: docs/simulator.md.
"""

from simulator.estate import Estate, EstateError, GuestSpec, VmSpec
from simulator.server import (
    ServeError,
    Simulator,
    SimulatorServer,
    serve_forever,
    serve_until_stopped,
    start_server,
)

__all__ = [
    "Estate",
    "EstateError",
    "GuestSpec",
    "ServeError",
    "Simulator",
    "SimulatorServer",
    "VmSpec",
    "serve_forever",
    "serve_until_stopped",
    "start_server",
]
