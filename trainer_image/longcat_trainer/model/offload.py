"""The frozen base's block weights in host memory, streamed to the card ahead of use (spec.training.offload: blocks).

Each block's frozen parameters become views of one flat device storage that holds bytes only while the block
runs; a flat pinned host copy holds them the rest of the time. A block's forward, wrapped outside its compiled
region and outside its checkpoint:

    forward    wait for block i's copy (started while block i-1 ran), start copying block i+1 on the side
               stream, run, empty the storage
    backward   a hook on the block's output gradient (it fires before the block's backward, recomputation
               included) waits for block i and starts block i-1; a hook on its input gradient (after the
               block's backward) empties block i; what is still on the card when backward ends is emptied then

The parameters keep their identity, shape and version counter (the bytes are copied into the storage, not the
tensors), so autograd's saved references, checkpoint recomputation, the compiled graphs' guards and DDP see
the parameters as before. Between uses they hold no memory at all: nothing but these hooks may read them then.
The LoRA adapters (trainable) and the modules outside the blocks stay on the card.

Why not diffusers' group offloading: it swaps `param.data` to the CPU after each forward and has no backward
hooks, so a backward pass (which needs every frozen Linear's weight for the input gradient) or a checkpoint's
recomputation finds CPU weights or onloads them one module at a time without prefetch; it is built for inference.

Copies run on one side CUDA stream: the compute stream waits on an event recorded after a block's copy, and
`record_stream` tells the allocator that the compute stream uses memory the side stream allocated, so emptying
a block never lets a later copy overwrite bytes queued kernels still read. On the CPU (tests) the same copies
run synchronously.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

# How many blocks are copied in ahead of the one running. At 480x832x93 a block's forward takes ~0.1 s and its
# copy (0.57 GB at 25-50 GB/s over PCIe) 0.01-0.02 s, so one ahead hides it; at 33 frames the forward is ~4x
# shorter and nears the copy time, which copying further ahead would not shorten (the link is the limit).
BLOCKS_AHEAD = 1
# Each weight starts on a boundary the compiled kernels' vector loads accept (the allocator's own is 512).
ALIGNMENT = 256


class _Where(enum.Enum):
    HOST = "host"
    COPYING = "copying"
    RESIDENT = "resident"


class _BlockWeights:
    """One block's frozen parameters: a flat host copy and the flat device storage the parameters view."""

    def __init__(self, block: nn.Module, device: torch.device) -> None:
        params = [p for p in block.parameters() if not p.requires_grad]
        offsets, end = [], 0
        for p in params:
            offsets.append(end)
            end += -(-p.numel() * p.element_size() // ALIGNMENT) * ALIGNMENT
        self.nbytes = end
        self.host = torch.empty(end, dtype=torch.uint8)
        self.device_bytes = torch.empty(end, dtype=torch.uint8, device=device)
        storage = self.device_bytes.untyped_storage()
        for p, offset in zip(params, offsets, strict=True):
            size = p.numel() * p.element_size()
            self.host[offset:offset + size].view(p.dtype).view(p.shape).copy_(p.detach())
            view = torch.empty(0, dtype=p.dtype, device=device)
            view.set_(storage, offset // p.element_size(), p.shape, torch.empty(p.shape, device="meta").stride())
            p.data = view  # the loaded tensor is released; the parameter object stays the same
        if device.type == "cuda":
            # Registered, not allocated pinned: the pinned allocator rounds every block up to a power of two.
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(self.host.data_ptr(), end, 0))
        storage.resize_(0)
        self.where = _Where.HOST
        self.copied: torch.cuda.Event | None = None

    @property
    def storage(self) -> torch.UntypedStorage:
        return self.device_bytes.untyped_storage()


class StreamedBlocks:
    """The blocks' frozen weights in host memory, each block's copied to the card around its forward and backward."""

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device) -> None:
        self.device = device
        self.weights = [_BlockWeights(block, device) for block in blocks]
        self.copies = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._cleanup_queued = False

    @property
    def window_bytes(self) -> int:
        """Block weights on the card at once at most: the one running and the ones copied ahead."""
        return (1 + BLOCKS_AHEAD) * max(w.nbytes for w in self.weights)

    def resident(self, index: int) -> bool:
        """Whether block `index`'s weights hold device memory (copied in or on their way)."""
        return self.weights[index].storage.nbytes() > 0

    def wrap(self, blocks: Sequence[nn.Module]) -> None:
        """Put the streaming around each block's current forward (its checkpointing and compiled region)."""
        for index, block in enumerate(blocks):
            block.forward = self._streamed(index, block.forward)

    def _streamed(self, index: int, forward: Callable) -> Callable:
        last = len(self.weights) - 1

        def streamed(x: torch.Tensor, *args: object) -> torch.Tensor:
            self._arrive(index)
            self._start_range(index + 1, index + 1 + BLOCKS_AHEAD)
            recording = torch.is_grad_enabled()
            if recording and x.requires_grad:
                x = _EmptyAfterBackward.apply(x, self, index)
            out = forward(x, *args)
            if recording and out.requires_grad:
                out.register_hook(functools.partial(self._before_backward, index))
            if not (recording and index == last):  # the last block's backward comes first: it stays
                self._empty(index)
            return out

        return streamed

    def _start(self, index: int) -> None:
        """Begin copying block `index` in, unless it is on the card or on its way."""
        weights = self.weights[index]
        if weights.where is not _Where.HOST:
            return
        if self.copies is None:
            weights.storage.resize_(weights.nbytes)
            weights.device_bytes.copy_(weights.host)
        else:
            with torch.cuda.stream(self.copies):  # allocated on the side stream, so its pool orders the reuse
                weights.storage.resize_(weights.nbytes)
                weights.device_bytes.copy_(weights.host, non_blocking=True)
                weights.copied = torch.cuda.Event()
                weights.copied.record(self.copies)
        weights.where = _Where.COPYING

    def _start_range(self, start: int, stop: int) -> None:
        for index in range(max(0, start), min(stop, len(self.weights))):
            self._start(index)

    def _arrive(self, index: int) -> None:
        """Block `index`'s weights are there for the work queued next on the current stream."""
        self._start(index)
        weights = self.weights[index]
        if weights.where is _Where.COPYING:
            if weights.copied is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(weights.copied)
                weights.device_bytes.record_stream(compute)  # emptied later, reused only after compute is past it
                weights.copied = None
            weights.where = _Where.RESIDENT

    def _empty(self, index: int) -> None:
        weights = self.weights[index]
        weights.storage.resize_(0)
        weights.where = _Where.HOST
        weights.copied = None

    def _before_backward(self, index: int, grad: torch.Tensor) -> None:
        self._arrive(index)
        self._start_range(index - BLOCKS_AHEAD, index)
        if not self._cleanup_queued:  # blocks whose input needs no gradient (the first) have no later hook
            self._cleanup_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        for index in range(len(self.weights)):
            self._empty(index)
        self._cleanup_queued = False


class _EmptyAfterBackward(torch.autograd.Function):
    """Identity on a block's input whose backward runs once the block's backward is done: it empties the block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, streamed: StreamedBlocks, index: int) -> torch.Tensor:
        ctx.streamed, ctx.index = streamed, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.streamed._empty(ctx.index)
        return grad, None, None


def stream_blocks(dit: nn.Module, device: torch.device) -> StreamedBlocks:
    """The blocks' frozen weights to host memory, everything else (adapters, embedders, final layer) to `device`.

    The DiT may come loaded on the CPU (a card smaller than the model): only one block's weights are then ever
    copied at once.
    """
    streamed = StreamedBlocks(dit.blocks, device)
    dit.to(device)  # the streamed parameters are on `device` already (empty), so this moves only the rest
    return streamed
