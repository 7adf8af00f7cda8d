"""Running out of memory: recognising it, freeing memory, the memory budget, and the low-memory mode a node is
retried in.

* :func:`is_out_of_memory`: ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` is the same class), or
  a ``RuntimeError`` whose message says "out of memory" (older torch, other backends) or "can't allocate
  memory" (torch's CPU allocator).
* :func:`free_memory`: ``gc.collect()`` and, on CUDA, ``torch.cuda.empty_cache()``.
* The memory budget (``--memory-budget-mb``, ``COMFY_RUNNER_MEMORY_BUDGET_MB``; ``RunContext.memory_budget``
  in bytes): before the VAE decodes or encodes, and before each attention of the UNet (and of a ControlNet)
  computes its scores, the size of the largest allocation it is about to make is estimated from the tensor
  shapes and compared with the budget; over it, :func:`check_budget` raises ``torch.OutOfMemoryError`` as
  torch would. Without a budget nothing is checked and nothing changes.
* Low-memory mode (``NodeContext.low_memory``, switched on by the executor for the one retry of a node that
  ran out of memory): the VAE works in tiles (:mod:`airflow_comfy.runner.ops.vae`), the attention in slices
  of the ``batch × heads`` score matrices (diffusers' ``SlicedAttnProcessor``; the largest slice that fits the
  budget, one head at a time without a budget). What the mode did is written to
  ``NodeContext.low_memory_report`` and from there into the manifest and the run snapshot.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch

from airflow_comfy.runner.context import NodeContext

_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _MESSAGES)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def megabytes(nbytes: int | float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def budget_error(budget: int, nbytes: int, what: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(
        f"out of memory (memory budget): {what} needs {megabytes(nbytes)}, over the budget of "
        f"{megabytes(budget)} (--memory-budget-mb)")


def check_budget(ctx: NodeContext, nbytes: int, what: str) -> None:
    """Raise ``torch.OutOfMemoryError`` when a memory budget is set and ``nbytes`` (one allocation) exceeds it."""
    budget = ctx.run.memory_budget
    if budget is not None and nbytes > budget:
        raise budget_error(budget, nbytes, what)


# --- attention ----------------------------------------------------------------------------------------------------


class _GuardedAttention:
    """Stands in for an ``Attention`` module's processor while a node runs: checks the score matrix against the
    budget and hands over to the module's own processor, or (low-memory mode) computes it in slices."""

    def __init__(self, inner, ctx: NodeContext, label: str):
        self.inner = inner
        self.ctx = ctx
        self.label = label

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if hidden_states.ndim == 4:
            batch, tokens = hidden_states.shape[0], hidden_states.shape[2] * hidden_states.shape[3]
        else:
            batch, tokens = hidden_states.shape[0], hidden_states.shape[1]
        keys = tokens if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        upcast = getattr(attn, "upcast_attention", False) or getattr(attn, "upcast_softmax", False)
        itemsize = torch.float32.itemsize if upcast else hidden_states.element_size()
        rows = batch * attn.heads
        one = tokens * keys * itemsize
        budget = self.ctx.run.memory_budget
        if not self.ctx.low_memory:
            check_budget(self.ctx, rows * one, f"{self.label} attention scores [{batch}, {attn.heads}, {tokens}, "
                                               f"{keys}]")
            if temb is not None:
                kwargs["temb"] = temb
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if budget is None:
            size = 1
        else:
            size = min(rows, budget // one)
            if size < 1:
                raise budget_error(budget, one, f"{self.label} attention scores of one head [{tokens}, {keys}] "
                                                f"(sliced)")
        report = self.ctx.low_memory_report
        report["attention_slice"] = min(size, report.get("attention_slice", size))
        from diffusers.models.attention_processor import SlicedAttnProcessor

        return SlicedAttnProcessor(size)(attn, hidden_states, encoder_hidden_states, attention_mask)


@contextlib.contextmanager
def guarded_attention(ctx: NodeContext, *models: tuple[str, torch.nn.Module]) -> Iterator[None]:
    """While the block runs, every diffusers ``Attention`` in ``models`` (``(label, module)`` pairs) checks the
    memory budget, or works in slices in low-memory mode; their own processors come back afterwards (the
    models are shared through the model cache). Without a budget and outside low-memory mode: nothing."""
    if ctx.run.memory_budget is None and not ctx.low_memory:
        yield
        return
    from diffusers.models.attention_processor import Attention

    replaced: list[tuple[torch.nn.Module, object]] = []
    try:
        for label, model in models:
            for module in model.modules():
                if isinstance(module, Attention) and not isinstance(module.processor, _GuardedAttention):
                    replaced.append((module, module.processor))
                    module.set_processor(_GuardedAttention(module.processor, ctx, label))
        yield
    finally:
        for module, processor in reversed(replaced):
            module.set_processor(processor)
