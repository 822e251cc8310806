"""Ray's exception classes by what they mean for a request to a replica (``ray.py`` maps
them, once): imported from Ray only when a model is deployed, so that tests pass their own."""

from __future__ import annotations

import typing


class RayErrors(typing.NamedTuple):
    """Ray's exception classes by what they mean for a request.

    ``no_method``: the class of the error a replica raises for a method it does not have (the
    ``cause`` of the task error the caller gets, whose message names the method).
    """

    overloaded: tuple[type[BaseException], ...]
    replica_lost: tuple[type[BaseException], ...]
    other: tuple[type[BaseException], ...]
    no_method: type[BaseException] | None = None


def ray_errors() -> RayErrors:
    from ray.exceptions import ActorUnavailableError, RayActorError, RayError
    from ray.serve.exceptions import BackPressureError, RayServeException

    return RayErrors(
        overloaded=(BackPressureError,),
        replica_lost=(RayActorError, ActorUnavailableError),
        other=(RayError, RayServeException),
        no_method=RayServeException,
    )


def lacks(exc: BaseException, method: str, errors: RayErrors) -> bool:
    """Whether ``exc`` says the replica has no ``method`` (Serve raises its base exception,
    not a subclass, naming the method in quotes)."""
    cause = getattr(exc, "cause", None)
    return (
        errors.no_method is not None
        and type(cause) is errors.no_method
        and f"'{method}'" in str(cause)
    )
