"""Node-server messages cut rows into pieces that Ray sends inside the call (bikd/ray/messages.py)."""

import numpy as np
import pytest
import torch

from bikd.ray.messages import PIECE_BYTES, num_pieces, pieces, unpiece

#: Ray's default max_direct_call_object_size: larger arguments and return values go through the object store
RAY_INLINE_LIMIT = 100 * 1024


@pytest.mark.parametrize("num_rows,num_rel", [(0, 0), (0, 7), (1, 0), (580, 132), (2400, 0), (112, 3)])
def test_pieces_round_trip_and_stay_inline(num_rows, num_rel):
    gen = np.random.default_rng(0)
    entity = gen.standard_normal((num_rows, 200), dtype=np.float32)
    relation = gen.standard_normal((num_rel, 100), dtype=np.float32) if num_rel else None
    out = pieces(entity, relation)
    assert len(out) == num_pieces(entity.size + (relation.size if num_rel else 0))
    # each piece pickled (as Ray does, protocol 5 with its buffer out of band) stays under Ray's inline limit
    assert all(p.nbytes <= PIECE_BYTES < RAY_INLINE_LIMIT - 1024 for p in out)
    shapes = [(num_rows, 200)] + ([(num_rel, 100)] if num_rel else [])
    back = unpiece(out, *shapes)
    torch.testing.assert_close(back[0], torch.from_numpy(entity))
    if num_rel:
        torch.testing.assert_close(back[1], torch.from_numpy(relation))


def test_unpiece_rejects_a_wrong_shape():
    with pytest.raises(AssertionError):
        unpiece(pieces(np.ones((4, 3), np.float32)), (4, 2))
