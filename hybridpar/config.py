"""Configuration dataclasses shared by the library, the launcher and the CLI.

:class:`ParallelConfig` is the single place where the sizes of the parallel
dimensions (TP, PP, DP, TKNP) are checked. :func:`hybridpar.distributed.
parallel_state.compute_layout` builds one and calls :meth:`ParallelConfig.validate`,
so every entry point (Python API, CLI, notebooks) rejects bad input with the same
message, before any process is spawned.
"""

from __future__ import annotations

from dataclasses import dataclass


class ParallelConfigError(ValueError):
    """A parallel configuration that cannot be laid out; the message names the fix."""


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParallelConfigError(
            f"{name} must be an int >= 1, got {value!r} ({type(value).__name__}); "
            f"pass a positive integer (1 turns the dimension off)."
        )
    if value < 1:
        raise ParallelConfigError(
            f"{name} must be >= 1, got {value}; pass a positive integer (1 turns the dimension off)."
        )


@dataclass
class ParallelConfig:
    """Sizes of the parallel dimensions of one model replica group.

    Invariants checked by :meth:`validate`:

    * every size is an ``int >= 1``;
    * token parallelism (TKNP) and data parallelism (DP) are mutually exclusive:
      TKNP takes the place of the DP dimension in the rank layout;
    * ``enable_token_parallel`` agrees with ``token_parallel_size``
      (``None`` means "infer it": enabled iff ``token_parallel_size > 1``).
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    token_parallel_size: int = 1
    enable_token_parallel: bool | None = None

    @property
    def token_parallel_enabled(self) -> bool:
        """``enable_token_parallel`` with ``None`` resolved to ``token_parallel_size > 1``."""
        if self.enable_token_parallel is None:
            return self.token_parallel_size > 1
        return self.enable_token_parallel

    @property
    def world_size(self) -> int:
        """Ranks one instance of this configuration occupies: tp * pp * tknp * dp."""
        return (
            self.tensor_parallel_size
            * self.pipeline_parallel_size
            * self.token_parallel_size
            * self.data_parallel_size
        )

    def validate(self) -> ParallelConfig:
        """Raise :class:`ParallelConfigError` if the sizes are inconsistent; return ``self``."""
        for name in (
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "data_parallel_size",
            "token_parallel_size",
        ):
            _check_positive_int(name, getattr(self, name))
        enable = self.enable_token_parallel
        if enable is not None and not isinstance(enable, bool):
            raise ParallelConfigError(
                f"enable_token_parallel must be True, False or None (infer), got {enable!r}."
            )
        tknp = self.token_parallel_size
        if enable is True and tknp <= 1:
            raise ParallelConfigError(
                f"enable_token_parallel=True needs token_parallel_size >= 2, got {tknp}; "
                f"set token_parallel_size to the number of ranks per token-parallel group, "
                f"or leave enable_token_parallel=None."
            )
        if enable is False and tknp > 1:
            raise ParallelConfigError(
                f"token_parallel_size={tknp} but enable_token_parallel=False; set "
                f"enable_token_parallel=True (or None to infer it), or token_parallel_size=1."
            )
        if self.token_parallel_enabled and self.data_parallel_size > 1:
            raise ParallelConfigError(
                f"token parallelism (token_parallel_size={tknp}) and data parallelism "
                f"(data_parallel_size={self.data_parallel_size}) are mutually exclusive: TKNP "
                f"replaces the DP dimension. Pick one: set data_parallel_size=1 to use TKNP, "
                f"or token_parallel_size=1 to use DP."
            )
        return self

    def check_world_size(self, world_size: int) -> ParallelConfig:
        """Validate, then require ``world_size == tp * tknp * pp * dp`` exactly; return ``self``.

        For entry points that run exactly one instance of the configuration (the CLI, torchrun
        scripts). :func:`~hybridpar.distributed.parallel_state.compute_layout` is laxer: it
        accepts a multiple and fills the rest with external data-parallel replicas.
        """
        self.validate()
        if world_size != self.world_size:
            raise ParallelConfigError(
                f"world size {world_size} does not match tensor_parallel_size x token_parallel_size x "
                f"pipeline_parallel_size x data_parallel_size = {self.tensor_parallel_size} x "
                f"{self.token_parallel_size} x {self.pipeline_parallel_size} x {self.data_parallel_size} = "
                f"{self.world_size}; start {self.world_size} ranks (torchrun --nproc-per-node {self.world_size}) "
                f"or change the sizes so that their product is {world_size}."
            )
        return self
