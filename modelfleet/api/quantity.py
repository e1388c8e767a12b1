"""Kubernetes resource quantities ("8", "500m", "64Gi"): the one regex both the CRD and Python use."""

from decimal import Decimal, InvalidOperation
from typing import Annotated

from pydantic import BeforeValidator, WithJsonSchema

# The Kubernetes quantity grammar without a sign: a request is never negative.
QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)

_SUFFIXES = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}


def parse_quantity(value: str | int | float) -> Decimal:
    """Return the quantity's value in base units (cores, bytes); ValueError if it is not one."""
    import re

    if isinstance(value, bool):
        raise ValueError(f"expected a quantity such as '8', '500m' or '64Gi', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return Decimal(str(value))
    text = str(value).strip()
    if not re.match(QUANTITY_PATTERN, text):
        raise ValueError(
            f"{value!r} is not a Kubernetes quantity; use a number with an optional suffix "
            "such as '8', '500m', '64Gi' or '1e3'"
        )
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if suffix and text.endswith(suffix) and not text[: -len(suffix)].lower().endswith("e"):
            number, multiplier = text[: -len(suffix)], _SUFFIXES[suffix]
            break
    else:
        number, multiplier = text, Decimal(1)
    try:
        return Decimal(number) * multiplier
    except InvalidOperation as err:  # pragma: no cover - the regex admits only numbers
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from err


def _check_quantity(value: object) -> str:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        parse_quantity(value)
        return str(value)
    raise ValueError(f"expected a quantity such as '8', '500m' or '64Gi', got {value!r}")


Quantity = Annotated[
    str,
    BeforeValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A Kubernetes quantity; stored as the string the user wrote."""
