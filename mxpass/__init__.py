"""mxpass: quantization as a compile-time transformation of unmodified models.

    fast = torch.compile(model, backend=mxpass.backend)
    print(mxpass.last_report())

    model = mxpass.load("path/to/checkpoint")     # pre-quantized layers stay quantized
"""

from mxpass import ops  # noqa: F401  (defines the mxpass:: ops)
from mxpass.backend import MxpassBackend, backend, compile
from mxpass.calibrate import calibrate
from mxpass.checkpoint import load, save
from mxpass.config import QuantConfig
from mxpass.formats import Format, format_names, get_format
from mxpass.report import Report, last_report, reports

__all__ = [
    "MxpassBackend", "backend", "calibrate", "compile", "QuantConfig", "Format", "format_names",
    "get_format", "load", "Report", "last_report", "reports", "save",
]
__version__ = "0.1.0"
