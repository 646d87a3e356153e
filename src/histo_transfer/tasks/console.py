"""A quiet console: TensorFlow loaded without the banners its C++ libraries print while loading, before
their logging is set up (so TF_CPP_MIN_LOG_LEVEL cannot hold them back): the oneDNN and CPU-feature
INFO lines and absl's "All log messages before absl::InitializeLog()" warning. Nothing a user acts on;
every other line of the import still reaches stderr."""

from __future__ import annotations

import os
import sys
import tempfile

BANNERS = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
           "This TensorFlow binary is optimized", "To enable the following instructions")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its load-time banners dropped; INFO lines after it follow TF_CPP_MIN_LOG_LEVEL
    (1 unless set: warnings and errors only). A user who sets TF_CPP_MIN_LOG_LEVEL=0 sees everything."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        import tensorflow  # noqa: F401
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:  # the C++ side writes to file descriptor 2, not sys.stderr
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not any(banner in line for banner in BANNERS)))
