"""CUDA-graph replay of an encoder's packed forward, one graph per token-count bucket.

Small batches on a GPU are dominated by kernel-launch overhead; a captured graph replays the whole forward
in one launch. A forward can be captured because nothing in it synchronises with the host: token counts and
``max_seqlen`` come from the host-side batch, and the Triton kernels read ``cu_seqlens`` on the device.

Each bucket's graph is captured with static buffers: ``T_bucket`` token slots, ``max_batch + 1`` offsets and
``max_seqlen = min(T_bucket, model limit)`` (attention programs past a sequence's end exit at once, so a larger
``max_seqlen`` is correct). A batch of T tokens replays the smallest bucket with ``T_bucket >= T``: its real
tokens fill the first T slots and unused sequence slots get length 0. The ``T_bucket - T`` spare slots belong
to no sequence: attention never reads them, but the matrix products run over them — the price of a fixed
shape, bounded by the bucket spacing. Batches larger than every bucket run eagerly.

``capture=False`` runs the same static-buffer forward without a graph (any device or backend): it is how the
bucket logic is tested on a machine without a GPU.
"""
from __future__ import annotations

import bisect
import logging
import threading

import torch

from .batch import HostLayout, PackedBatch
from .models.encoder import Encoder

log = logging.getLogger("padfree")


class CudaGraphEncoder:
    """Wraps an :class:`Encoder` on CUDA whose kernels never synchronise (the Triton backend)."""

    def __init__(self, encoder: Encoder, buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048),
                 max_batch: int = 64, capture: bool = True):
        if capture:
            self._check_capturable(encoder)
        if not buckets or min(buckets) < 1 or max_batch < 1:
            raise ValueError(f"need buckets >= 1 token and max_batch >= 1; got {buckets} and {max_batch}")
        self.encoder = encoder
        self.buckets = tuple(sorted(buckets))
        self.max_batch = max_batch
        self.capture = capture
        self._lock = threading.Lock()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, PackedBatch, torch.Tensor | None]] = {}

    @staticmethod
    def _check_capturable(encoder: Encoder) -> None:
        if encoder.device.type != "cuda":
            raise ValueError(f"CUDA graphs need an encoder on a CUDA device; this one is on {encoder.device}")
        syncing = [op for op, name in encoder.kernels.names.items() if name not in ("triton", "composed(triton)")]
        if syncing:
            raise ValueError(f"CUDA graphs need the triton backend for every op; {syncing} use "
                             f"{[encoder.kernels.names[o] for o in syncing]}, which read offsets on the host")

    def _capture(self, bucket: int):
        dev = self.encoder.device
        zeros = lambda: torch.zeros(bucket, dtype=torch.int64, device=dev)  # noqa: E731
        cu = torch.zeros(self.max_batch + 1, dtype=torch.int32, device=dev)  # [max_batch + 1]
        # the static layout (spare token slots, empty sequence slots, max_seqlen = the bucket) is not a batch a
        # user may build, so it carries its host layout and skips PackedBatch.validate
        static = PackedBatch(zeros(), zeros(), zeros(), cu, min(bucket, self.encoder.config.max_sequence_length),
                             host=HostLayout.of((0,) * self.max_batch))
        if not self.capture:
            return None, static, None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: compiles kernels, allocates workspaces
            for _ in range(2):
                self.encoder.forward_packed(static, check=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.encoder.forward_packed(static, check=False)  # [bucket, H]
        log.info("padfree: captured a CUDA graph for %d token slots", bucket)
        return graph, static, out

    def forward_packed(self, batch: PackedBatch, check: bool = True) -> torch.Tensor:
        """Same result as ``encoder.forward_packed(batch)``: ``[T, H]``."""
        T, B = batch.num_tokens, batch.batch_size
        i = bisect.bisect_left(self.buckets, T)
        if i == len(self.buckets) or B > self.max_batch:
            return self.encoder.forward_packed(batch, check=check)
        if check:
            self.encoder.check_batch(batch)
        bucket = self.buckets[i]
        with self._lock:  # one set of static buffers per bucket: one batch at a time goes through them
            if bucket not in self._graphs:
                self._graphs[bucket] = self._capture(bucket)
            graph, static, out = self._graphs[bucket]
            for name in ("input_ids", "token_type_ids", "position_ids"):
                getattr(static, name)[:T].copy_(getattr(batch, name), non_blocking=True)
            static.cu_seqlens[:B + 1].copy_(batch.cu_seqlens, non_blocking=True)
            static.cu_seqlens[B + 1:].fill_(T)  # unused sequence slots: length 0
            if graph is None:  # eager on the static buffers, with this batch's runs (and empty slots) from the host
                lengths = batch.host.lengths + (0,) * (self.max_batch - B)
                eager = PackedBatch(static.input_ids, static.token_type_ids, static.position_ids, static.cu_seqlens,
                                    static.max_seqlen, host=HostLayout.of(lengths))
                return self.encoder.forward_packed(eager, check=False)[:T]
            graph.replay()
            return out[:T].clone()
