"""`Value`: the base of the metadata parsers' immutable records (`Problem`, `Field`,
`FileIdentity`, `Snapshot`), compared and hashed by their fields.

These records are what `qinspect info` builds, and `info` must start in a few milliseconds: a
dataclass imports `inspect` (~5 ms) and a `typing.NamedTuple` needs `typing` (~3 ms) and ~0.1 ms
to define. A record names its fields in `FIELDS`, in its constructor's order, declares them in
`__slots__` and sets them in `__init__` with `_assign`; `Value` gives it equality and hashing by
those fields, a repr, pickling, and refuses assignment afterwards.
"""

from __future__ import annotations


class Value:
    """An immutable record of the fields named in `FIELDS`."""

    __slots__ = ()
    FIELDS: tuple[str, ...] = ()

    def _assign(self, *values: object) -> None:
        """Set the fields, in `FIELDS` order (for the subclass's `__init__`)."""
        for name, value in zip(self.FIELDS, values, strict=True):
            object.__setattr__(self, name, value)

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if type(other) is type(self) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> tuple[type[Value], tuple[object, ...]]:
        return type(self), self._key()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"{type(self).__name__}({fields})"
