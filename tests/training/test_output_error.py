"""``genkit.OutputError``: one class for every output that cannot be written."""

import numpy as np
import pytest
from trainhelp import TinyModel

import genkit
import genkit.data.errors as data_errors
from genkit.errors import DataError, GenkitError, OutputError
from genkit.training import TrainConfig, Trainer
from genkit.training import checkpoint as ckpt


def test_the_data_layers_output_error_is_the_top_level_one_and_still_a_data_error(tmp_path):
    assert genkit.OutputError is OutputError
    assert issubclass(OutputError, GenkitError) and issubclass(OutputError, OSError)
    assert issubclass(data_errors.OutputError, OutputError)
    assert issubclass(data_errors.OutputError, DataError)  # old except clauses still work
    from genkit.data import DatasetArrays, SplitArrays, write_h5

    target = tmp_path / "x.h5"
    target.write_text("in the way")
    arrays = DatasetArrays(
        splits={"train": SplitArrays(data=np.zeros((2, 3), np.float32))}, attrs={}
    )
    with pytest.raises(OutputError, match="already exists"):  # raised by genkit.data
        write_h5(arrays, target)


def test_trainer_outputs_that_cannot_be_written_raise_the_top_level_error(tmp_path, images):
    blocker = tmp_path / "blocker"
    blocker.write_text("")  # a file where the run dir's folder should be
    cfg = TrainConfig(steps=2, batch_size=16, eval_every=0)
    trainer = Trainer(TinyModel(), cfg, images, run_dir=blocker / "run", progress=False)
    with pytest.raises(OutputError) as err:
        trainer.fit()
    assert type(err.value) is OutputError and not isinstance(err.value, DataError)
    assert str(err.value).startswith(f"cannot write run config {blocker / 'run' / 'config.json'}")

    def disk_full(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"cannot write checkpoint .*No space left on device"):
        ckpt.write_atomic(tmp_path / "c" / "step-1.pt", disk_full, what="checkpoint")
    assert list((tmp_path / "c").iterdir()) == []  # nothing half-written is left
