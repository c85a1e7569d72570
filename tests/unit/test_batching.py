

def test_length_chunks_bound_padding_and_cover_every_index():
    from locaudit.models.batching import length_chunks

    lengths = [3, 30, 4, 5, 29, 6, 3, 31, 4, 5, 28, 7]
    chunks = length_chunks(lengths, max_size=5)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for c in chunks:
        assert len(c) <= 5
        L = [lengths[i] for i in c]
        assert L == sorted(L)
        if len(c) > 4:  # past the minimum size, padding stays within the bound
            assert len(c) * max(L) <= 1.25 * sum(L)
    # the short and the long texts never share a chunk here
    assert all(max(lengths[i] for i in c) < 10 or min(lengths[i] for i in c) > 20 for c in chunks)
    assert length_chunks([], 4) == [] and length_chunks([2, 2, 2], 1) == [[0], [1], [2]]
