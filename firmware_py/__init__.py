"""powershare-gw: a parked electric pickup powering the home and serving grid dispatch.

An installed distribution carries the simulator inside this package
(`firmware_py/sim`); a source checkout keeps it at the top (`sim/`, the project's
fixed layout). Imported straight from a checkout (`python -m firmware_py` run in
its root), the package also looks for subpackages beside itself, so
`firmware_py.sim` is the checkout's `sim/`, exactly as an install maps it.
"""

from pathlib import Path as _Path

_HERE = _Path(__file__).resolve().parent
if not (_HERE / "sim").exists() and (_HERE.parent / "sim" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # noqa: F821 - a package's own __path__
