from scmmgpt.utils.distinct import distinct


def test_distinct_first_occurrences_and_inverse():
    items = ["b", "a", "b", "c", "a"]
    first, inverse = distinct(items)
    assert first == [0, 1, 3] and inverse == [0, 1, 0, 2, 1]
    assert [items[first[j]] for j in inverse] == items
    assert distinct([]) == ([], [])
