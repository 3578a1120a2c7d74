"""What the `throttle_reasons` bitmask of `gpu.parquet` means (NVML clocks event reasons).

Shared by the NVML collector (which writes the decoded names) and the analyzers (which read
them), so neither imports the other. Bits and names are NVML's
(`nvmlClocksEventReason*`, formerly `nvmlClocksThrottleReason*`).
"""

from __future__ import annotations

REASON_BITS: tuple[tuple[int, str], ...] = (
    (0x1, "GpuIdle"),
    (0x2, "ApplicationsClocksSetting"),
    (0x4, "SwPowerCap"),
    (0x8, "HwSlowdown"),
    (0x10, "SyncBoost"),
    (0x20, "SwThermalSlowdown"),
    (0x40, "HwThermalSlowdown"),
    (0x80, "HwPowerBrakeSlowdown"),
    (0x100, "DisplayClockSetting"),
)
IDLE = 0x1
# Every reason except GpuIdle lowers the clocks of a busy GPU below what it could run at.
SLOWDOWN_MASK = 0x1FE


def decode_reasons(mask: int | None) -> list[str] | None:
    """The names of the bits set in `mask`, lowest bit first; unknown bits as `bit0x...`.

    None stays None (the reasons could not be read); 0 is an empty list (no reason)."""
    if mask is None:
        return None
    mask = int(mask)
    names = [name for bit, name in REASON_BITS if mask & bit]
    known = 0
    for bit, _ in REASON_BITS:
        known |= bit
    rest = mask & ~known
    bit = 1
    while rest:
        if rest & bit:
            names.append(f"bit{bit:#x}")
            rest &= ~bit
        bit <<= 1
    return names


def is_slowdown(mask: int | None) -> bool:
    """True when a reason other than GpuIdle is set (the clock is held down)."""
    return bool(mask) and bool(int(mask) & ~IDLE)
