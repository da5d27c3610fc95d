"""`powershare-gw commission`: a guided check of a real installation, ending in a pass/fail report.

Four modules, so that what decides stays apart from what touches the hardware:
- `report`: the report itself (steps, checks, outcomes), its terminal and JSON forms;
- `judgement`: pure functions that turn observations (frame timings, decoded values,
  SunSpec discovery, samples of a test discharge) into checks, each failure saying
  what is wrong and what to look at; unit-tested without any I/O;
- `probes`: the I/O that gathers those observations, on the gateway's own assembly
  (its CAN bus, inverter client, core and integrations), as `run` would build them;
- `commands`: the command line, which runs the steps in order.
"""
