"""The one shape of progress every long job reports: plain data, ``step`` of ``total``.

Training (``trainer.StepInfo``), profiling and OVI hand their callback a dataclass that starts
with these two fields and adds what the job measures (k-diffusion's plain-data callback, typed);
the node layer turns any of them into ComfyUI's progress bar and Cancel check without knowing
which job it is.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Progress"]


@dataclass
class Progress:
    """``step`` units of work done (1-based once one is done) out of ``total``."""

    step: int
    total: int
