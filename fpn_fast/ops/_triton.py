"""Triton backend (placeholder until the Triton kernels land)."""
from typing import Optional


def unavailable_reason(device_type: str) -> Optional[str]:
    return "the Triton kernels are not implemented yet"
