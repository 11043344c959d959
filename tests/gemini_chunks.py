"""For tests of colossalai's Gemini chunks and training/gemini_fixes.py: a gradient chunk built without a process
group, and a count of the host synchronisations (`Tensor.item`) a piece of code makes."""
from contextlib import contextmanager
from unittest import mock

import torch


def gradient_chunk(values: torch.Tensor, gathered: bool):
    """A colossalai Chunk holding `values` as reduced gradients, bypassing its constructor (which needs a process
    group): gathered, or as this rank's shard."""
    from colossalai.zero.gemini.chunk import Chunk

    chunk = Chunk.__new__(Chunk)
    chunk.dtype, chunk.l2_norm, chunk.is_gathered = values.dtype, None, gathered
    if gathered:
        chunk.cuda_global_chunk, chunk.utilized_size = torch.cat([values, values.new_zeros(3)]), len(values)
    else:
        chunk.cuda_shard, chunk.valid_end = torch.cat([values, values.new_zeros(3)]), len(values)
    return chunk


@contextmanager
def counted_item_calls():
    """For the duration, every Tensor.item() call still runs and is appended to the yielded list."""
    real_item, calls = torch.Tensor.item, []
    with mock.patch.object(torch.Tensor, "item", lambda t: calls.append(t) or real_item(t)):
        yield calls
