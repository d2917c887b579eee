"""Extension backend (placeholder until the C++/CUDA extension lands)."""
from typing import Optional


def unavailable_reason(device_type: str) -> Optional[str]:
    return "the compiled extension is not implemented yet"
