import numpy as np
import pytest
import torch

from hf_trak import TRAKer
from hf_trak.errors import InvalidArgumentError, InvalidInputError, NotFeaturizedError, NotFoundError
from hf_trak.testing.datasets import digits, token_sequences
from hf_trak.testing.models import tiny_bert, tiny_vit


def test_missing_labels_column_is_named():
    model = tiny_bert()
    data = token_sequences(6).remove_columns("labels")
    with pytest.raises(ValueError, match=r"no \['labels'\] column"):
        TRAKer(model, proj_dim=8, save_dir=None).featurize(data, [model.state_dict()])


def test_label_column_is_accepted_as_labels():
    model = tiny_bert()
    data = token_sequences(6)
    renamed = data.rename_column("labels", "label")
    a = TRAKer(model, proj_dim=8, save_dir=None).featurize(data, [model.state_dict()])
    b = TRAKer(model, proj_dim=8, save_dir=None).featurize(renamed, [model.state_dict()])
    np.testing.assert_array_equal(a.store.features(0), b.store.features(0))


def test_empty_dataset_is_refused():
    model = tiny_vit()
    with pytest.raises(ValueError, match="empty"):
        TRAKer(model, proj_dim=8, save_dir=None).featurize(digits(5).select([]), [model.state_dict()])


def test_dataloader_of_dict_batches_gives_the_same_features():
    model, data = tiny_vit(), digits(10)
    loader = torch.utils.data.DataLoader(data.with_format("torch"), batch_size=3)
    a = TRAKer(model, proj_dim=8, save_dir=None).featurize(data, [model.state_dict()], batch_size=4)
    b = TRAKer(model, proj_dim=8, save_dir=None).featurize(loader, [model.state_dict()])
    np.testing.assert_array_equal(a.store.features(0), b.store.features(0))


def test_wrong_inputs_are_refused_with_a_fix():
    model = tiny_vit()
    with pytest.raises(InvalidArgumentError, match="datasets.Dataset or a torch DataLoader"):
        TRAKer(model, proj_dim=8, save_dir=None).featurize([{"pixel_values": 1}], [model.state_dict()])
    with pytest.raises(InvalidArgumentError, match="at least one checkpoint"):
        TRAKer(model, proj_dim=8, save_dir=None).featurize(digits(4), [])
    with pytest.raises(InvalidArgumentError, match="different model"):
        TRAKer(model, proj_dim=8, save_dir=None).featurize(digits(4), [tiny_bert().state_dict()])
    with pytest.raises(NotFeaturizedError, match="featurize"):
        TRAKer(model, proj_dim=8, save_dir=None).score(digits(4))
    with pytest.raises(InvalidArgumentError, match="projector must be one of"):
        TRAKer(model, proj_dim=8, projector="sparse", save_dir=None)
    with pytest.raises(InvalidArgumentError, match="grad_wrt names parameters"):
        TRAKer(model, proj_dim=8, save_dir=None, grad_wrt=["nope.weight"])
    with pytest.raises(InvalidInputError, match="DataLoader must yield dict batches"):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8)), batch_size=2)
        TRAKer(model, proj_dim=8, save_dir=None).featurize(loader, [model.state_dict()])
    with pytest.raises(NotFoundError, match="save_pretrained"):
        TRAKer(model, proj_dim=8, save_dir=None).featurize(digits(4), ["/nonexistent/checkpoint-1"])
    with pytest.raises(ValueError, match="Unknown task"):
        TRAKer(model, task="regression", save_dir=None)
