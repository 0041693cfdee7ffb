"""The one exception type of `rmi_triton.export`."""

from __future__ import annotations


class ExportError(RuntimeError):
    """Export, verification or comparison cannot go on; the message says why in one line."""
