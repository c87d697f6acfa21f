"""The shape of a benchmark case, shared by every op's benchmark file and the runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Target:
    """``peer_time / our_time >= min_ratio`` (a speed-up target; 1/3 means 'within 3x'); with peer
    ``"floor"``, ``floor_time / our_time >= min_ratio`` (the case's floor_bytes at the measured copy
    bandwidth; 0.5 means 'within 2x of the memory floor'); with ``max_bytes``, a memory target: our
    peak extra memory ``<= max_bytes``; with ``max_seconds``, a time target: our time per call
    ``<= max_seconds`` (host overhead); with ``max_peak_ratio``, a memory target against ``peer``: our
    peak extra memory ``<= max_peak_ratio`` times the peer's."""

    peer: str
    min_ratio: float
    label: str
    max_bytes: Optional[int] = None
    max_seconds: Optional[float] = None
    max_peak_ratio: Optional[float] = None


@dataclass
class Case:
    op: str
    shape: str
    mode: str
    dtype: str
    ours: str
    impls: dict[str, Callable[[], Callable[[], object]]]  # name -> setup() returning the timed call
    targets: list[Target] = field(default_factory=list)
    floor_bytes: Optional[int] = None  # fewest bytes the op must move (inputs read + outputs written)
    floor_flops: Optional[int] = None
    repeats: int = 3
    calls: int = 1  # op calls per timed call (time_s is reported per op call)
    # Modes of the GPU check (benchmarks/gpu_check.sh): a headline case is timed first; an extended
    # case (or implementation) runs only in the second, extended pass (torch.compile peers, FlexAttention,
    # whole blocks and models), which a short GPU lease may not reach.
    headline: bool = False
    extended: bool = False
    extended_impls: frozenset = frozenset()
    # Scaling curves (python -m benchmarks.run --scaling): the panel this case belongs to and its size.
    scaling_group: str = ""
    size: float = 0.0
    size_label: str = ""
