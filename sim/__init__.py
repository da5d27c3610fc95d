"""The bench simulator: pack, BMS node, inverter and aggregators around the real gateway.

Installed as `firmware_py.sim` (the source folder is `sim/` at the top of the checkout),
so nothing the distribution installs claims a generic top-level name.
"""
