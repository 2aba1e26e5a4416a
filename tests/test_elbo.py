"""ELBOTerms bookkeeping and the generic estimators (``elbo``, ``iwae``)."""

import math

import pytest
import torch

from genkit import ELBOTerms, InvalidParameterError, create_estimator
from genkit.elbo import IWAE


def _terms():
    return ELBOTerms(
        terms={
            "reconstruction": torch.tensor([-10.0, -20.0]),
            "prior_matching": torch.tensor([-1.0, -2.0]),
        },
        extras={"simple": torch.tensor([-3.0, -4.0])},
        num_dims=4,
    )


def test_total_and_bits_per_dim_by_hand():
    t = _terms()
    torch.testing.assert_close(t.total, torch.tensor([-11.0, -22.0]))
    torch.testing.assert_close(t.bits_per_dim(), torch.tensor([11.0, 22.0]) / (4 * math.log(2)))


def test_objective_weights_terms_and_extras_and_rejects_unknown_names():
    t = _terms()
    torch.testing.assert_close(t.objective(), torch.tensor([11.0, 22.0]))  # extras weigh 0
    torch.testing.assert_close(
        t.objective({"prior_matching": 0.5, "simple": 2.0}), torch.tensor([10.5 + 6.0, 21.0 + 8.0])
    )
    with pytest.raises(InvalidParameterError, match="unknown term 'prior_match'"):
        t.objective({"prior_match": 1.0})


def test_terms_must_share_a_batch_shape():
    with pytest.raises(ValueError, match="same shape"):
        ELBOTerms(terms={"a": torch.zeros(2), "b": torch.zeros(3)}, num_dims=1)
    with pytest.raises(ValueError, match="same shape"):
        ELBOTerms(terms={"a": torch.zeros(2, 1)}, num_dims=1)
    # an extra of another shape would broadcast silently inside objective()
    with pytest.raises(InvalidParameterError, match=r"extra must have the terms' shape \(2,\)"):
        ELBOTerms(terms={"a": torch.zeros(2)}, extras={"e": torch.zeros(2, 2)}, num_dims=1)
    with pytest.raises(InvalidParameterError, match="same shape"):
        ELBOTerms(terms={"a": torch.zeros(2), "b": torch.zeros(3)}, num_dims=1)


def test_terms_are_read_only():
    t = _terms()
    with pytest.raises(TypeError):
        t.terms["x"] = torch.zeros(2)


def test_estimators_are_registered_and_validate_their_parameters():
    assert isinstance(create_estimator("iwae", k=3), IWAE)
    with pytest.raises(InvalidParameterError, match="k must be an integer >= 1"):
        create_estimator("iwae", k=0)
    with pytest.raises(InvalidParameterError, match="valid parameters: k"):
        create_estimator("iwae", kk=3)


@pytest.mark.parametrize("num_dims", [0, -3, 2.0, True])
def test_num_dims_must_be_a_positive_int(num_dims):
    with pytest.raises(InvalidParameterError, match="num_dims"):
        ELBOTerms(terms={"a": torch.zeros(2)}, num_dims=num_dims)
