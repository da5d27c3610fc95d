"""The loopback VTN now lives in `sim.vtn` (the bench runs it too); kept for the tests' imports."""

from firmware_py.sim.vtn import (LOAD_DISPATCH, SIMPLE, LoopbackVtn, OptResponse, ReportValue, TlsMaterial,
                     make_tls_material)

__all__ = ["LOAD_DISPATCH", "SIMPLE", "LoopbackVtn", "OptResponse", "ReportValue", "TlsMaterial",
           "make_tls_material"]
