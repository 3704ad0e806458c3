"""Run Python on a Fleetbox fleet.

>>> from fleetbox import Fleet
>>> fleet = Fleet()                      # FLEETBOX_SERVER / FLEETBOX_TOKEN
>>> fleet.run("print(6 * 7)").stdout
'42\\n'
>>> fleet.map(square, range(10))         # a module-level function, sent as its source
[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]
"""

from ._common import FileInfo, Result
from .client import AsyncFleet, AsyncJob, AsyncSession, Fleet, Job, Session
from .errors import FleetboxError, JobFailed, SessionLost, Timeout

__all__ = [
    "AsyncFleet",
    "AsyncJob",
    "AsyncSession",
    "FileInfo",
    "Fleet",
    "FleetboxError",
    "Job",
    "JobFailed",
    "Result",
    "Session",
    "SessionLost",
    "Timeout",
]
__version__ = "0.1.0"
