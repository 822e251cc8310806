"""The checks a model makes of a request before any of its inputs queue, shared by the
in-process models (``local.py``) and the gateway side of Ray replicas (``ray.py``).

A Ray model runs them in the gateway, before it calls a replica: a request the replica would
refuse at once is refused without a Ray round trip, with the same status and message, and is
answered even when no replica can answer (a stuck or restarting one).
"""

from __future__ import annotations

from embedplex.core.errors import EmptyInputError, InvalidRequestError, PayloadTooLargeError


def check_size(n: int, param: str, limit: int | None) -> None:
    """At least one input of ``param``, and at most ``limit`` (``max_client_batch_size``;
    None: no limit known here)."""
    if n == 0:
        raise EmptyInputError(f"{param} cannot be empty", param=param)
    if limit is not None and n > limit:
        raise PayloadTooLargeError(
            f"batch size {n} > maximum allowed batch size {limit}", param=param
        )


def check_dimensions(dims: int | None, dim: int) -> None:
    """``dimensions`` (Matryoshka) between 1 and the model's ``dim``."""
    if dims is not None and not 1 <= dims <= dim:
        raise InvalidRequestError(
            f"dimensions must be between 1 and {dim}, got {dims}", param="dimensions"
        )


def named_prompt(prompt_name: str, prompts: dict[str, str]) -> str:
    """The model's prompt named ``prompt_name``."""
    if prompt_name not in prompts:
        known = ", ".join(sorted(prompts)) or "none"
        raise InvalidRequestError(
            f"unknown prompt_name {prompt_name!r} (this model has: {known})",
            param="prompt_name",
        )
    return prompts[prompt_name]
