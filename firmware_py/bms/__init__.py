"""The vehicle side: BMS frames on CAN -> `BmsSnapshot` (docs/can.md).

`BmsReader` decodes and judges frames, `BmsListener` plugs it into a python-can
Notifier, `captures` reads recorded traffic (python-can logs and ELM327 text),
and `commands` adds `powershare-gw bms record|decode`.
"""

from firmware_py.bms.reader import BmsListener, BmsReader, reader_from_config

__all__ = ["BmsListener", "BmsReader", "reader_from_config"]
