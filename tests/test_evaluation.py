import math

import pytest
import torch

from optimum_lrpqvit.evaluation import embedding_fidelity, fidelity, knn_top1


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_knn_votes_with_the_summed_similarity_of_the_k_nearest():
    # two class-0 neighbours at 66° from the query (cos 0.41 each) against one class-1 neighbour at 8° (cos 0.99):
    # a majority vote would say 0, the summed similarity says 1
    index = torch.tensor([_unit(66), _unit(-66), _unit(8), _unit(180)])
    index_labels = torch.tensor([0, 0, 1, 2])
    query = torch.tensor([_unit(0)]) * 3.0  # the scale of an embedding does not matter
    assert knn_top1(index, index_labels, query, torch.tensor([1]), k=3) == 100.0
    assert knn_top1(index, index_labels, query, torch.tensor([0]), k=3) == 0.0
    assert knn_top1(index, index_labels, query, torch.tensor([1]), k=10) == 100.0  # k above the index size


def test_embedding_fidelity_is_one_against_itself_and_sees_a_rotation():
    g = torch.Generator().manual_seed(0)
    index, queries = torch.randn(50, 8, generator=g), torch.randn(20, 8, generator=g)
    index_labels, labels = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (20,), generator=g)
    same = embedding_fidelity(queries, labels, (index, index_labels), reference=queries)
    assert same["cosine"] == pytest.approx(1.0) and same["cosine_min"] == pytest.approx(1.0)
    assert same["knn_top1"] == knn_top1(index, index_labels, queries, labels)
    turned = embedding_fidelity(queries.roll(1, dims=1), labels, (index, index_labels), reference=queries)
    assert turned["cosine_min"] <= turned["cosine"] < 0.9
    assert set(fidelity(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))) == {"top1"}
