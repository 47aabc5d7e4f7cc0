"""Which implementation of the per-request and per-step work runs: the C
module ``_native`` (built by ``pip install`` where a C compiler and the
Python headers are found), else the pure-Python one in ``_table``,
``_steps`` and ``_scope``, which writes the same table the same way at a
higher cost per request. ``LOOPGUARD_ASGI_NATIVE=off`` picks the
pure-Python one."""

import importlib
import logging
import os

from . import _table

native = None
why_not = None
_chosen = os.environ.get("LOOPGUARD_ASGI_NATIVE", "").lower() in ("0", "off", "false", "no")

if _chosen:
    why_not = "LOOPGUARD_ASGI_NATIVE is off"
else:
    try:
        native = importlib.import_module("._native", __package__)
    except ImportError as error:
        why_not = f"its C module is not built: {error}"
    else:
        layout = (_table.MAGIC, _table.STEPS_VERSION, _table.SLOTS, _table.SLOT_BYTES,
                  _table.STEPS_AT, _table.STEP_BYTES, _table.TABLE_BYTES, _table.LONG_STEP_NS)
        built = (native.MAGIC, native.STEPS_VERSION, native.SLOTS, native.SLOT_BYTES,
                 native.STEPS_AT, native.STEP_BYTES, native.TABLE_BYTES, native.LONG_STEP_NS)
        if built != layout:
            native, why_not = None, f"its C module has another table layout: {built} != {layout}"

_said = False


def say_once():
    """Says once per process (when the table is made) that the pure-Python
    path runs and why, unless it was chosen."""
    global _said
    if native is None and not _chosen and not _said:
        _said = True
        logging.getLogger("loopguard_asgi").warning(
            "loopguard-asgi runs its pure-Python path (%s); install it again with a C "
            "compiler and the Python headers present (CPython 3.10 or later) for the C "
            "path, about a quarter of the cost per request", why_not,
        )
