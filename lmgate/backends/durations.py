"""SLURM's duration syntax, used by the configuration (walltime) and by squeue's output."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_duration(text: str) -> float | None:
    """SLURM durations (`minutes`, `mm:ss`, `hh:mm:ss`, `d-hh[:mm[:ss]]`) in seconds.

    None for `UNLIMITED`, `NOT_SET`, `INVALID` or anything unparsable.
    """
    m = _DURATION.match(text.strip())
    if m is None:
        return None
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # d-hh, d-hh:mm, d-hh:mm:ss
        nums += [0] * (3 - len(nums))
        return float(int(days) * 86400 + nums[0] * 3600 + nums[1] * 60 + nums[2])
    if len(nums) == 1:
        return float(nums[0] * 60)
    if len(nums) == 2:
        return float(nums[0] * 60 + nums[1])
    return float(nums[0] * 3600 + nums[1] * 60 + nums[2])
