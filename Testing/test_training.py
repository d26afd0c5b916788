"""Training on a tiny real-file data set: determinism, exact resume, outputs and refusals."""
import csv

import pytest
import torch

from LightFusionLib.cli import main
from LightFusionLib.models import ModelError, load_model, read_model_file
from LightFusionLib.network import NetworkConfig
from LightFusionLib.training import TrainConfig, checkpoint_path, log_path, train
from tiny_pairs import make_pairs


def config(tmp_path, out, **kw):
    defaults = dict(data=tmp_path / "data", task="pet-mri", out=tmp_path / out, epochs=2, batch_size=2,
                    crop=16, seed=3, device="cpu", progress=False, val_cases=["3"], val_every=1,
                    network=NetworkConfig(width=8, reduction=4))
    defaults.update(kw)
    return TrainConfig(**defaults)


@pytest.fixture
def data(tmp_path):
    return make_pairs(tmp_path / "data")


def weights(path):
    return read_model_file(path)["state_dict"]


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_fixed_seed_reproduces_weights(tmp_path, data):
    train(config(tmp_path, "a.pt"))
    train(config(tmp_path, "b.pt"))
    assert same(weights(tmp_path / "a.pt"), weights(tmp_path / "b.pt"))
    train(config(tmp_path, "c.pt", seed=4))
    assert not same(weights(tmp_path / "a.pt"), weights(tmp_path / "c.pt"))


def test_resume_continues_exactly(tmp_path, data):
    train(config(tmp_path, "full.pt", epochs=3))
    train(config(tmp_path, "part.pt", epochs=1))
    result = train(config(tmp_path, "part.pt", epochs=3, resume=checkpoint_path(tmp_path / "part.pt")))
    assert result["epochs"] == 3
    assert same(weights(tmp_path / "full.pt"), weights(tmp_path / "part.pt"))
    with open(log_path(tmp_path / "part.pt")) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert all(float(r["val_loss"]) > 0 for r in rows)


def test_training_lowers_the_loss(tmp_path, data):
    result = train(config(tmp_path, "m.pt", epochs=6, lr=1e-2, val_cases=[]))
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < losses[0]
    net, payload = load_model(tmp_path / "m.pt", "pet-mri")
    assert payload["meta"]["train_pairs"] == 5 and payload["config"]["width"] == 8
    with pytest.raises(ModelError, match="trained for pet-mri, not ct-mri"):
        load_model(tmp_path / "m.pt", "ct-mri")


def test_refuses_to_overwrite_without_force(tmp_path, data, capsys):
    out = tmp_path / "m.pt"
    out.write_bytes(b"precious")
    args = ["train", "--data", str(data), "--task", "pet-mri", "--out", str(out), "--epochs", "1",
            "--crop", "16", "--width", "8"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "exists" in err and "--force" in err
    assert out.read_bytes() == b"precious"
    assert main(args + ["--force", "--val-cases", "9"]) == 2  # unknown case: clear error, nothing written
    assert "not in data" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(args + ["--force"]) == 0
    assert read_model_file(out)["task"] == "pet-mri"


def test_loss_weights_default_to_the_tasks_validated_preset(tmp_path):
    from LightFusionLib.losses import PAPER_ABLATION, PAPER_EQ5

    make_pairs(tmp_path / "ct", modality="CT")
    make_pairs(tmp_path / "pet")
    assert main(["train", "--data", str(tmp_path / "ct"), "--task", "ct-mri", "--out", str(tmp_path / "ct.pt"),
                 "--epochs", "1", "--crop", "16", "--width", "8"]) == 0
    assert main(["train", "--data", str(tmp_path / "pet"), "--task", "pet-mri", "--out", str(tmp_path / "pet.pt"),
                 "--epochs", "1", "--crop", "16", "--width", "8", "--w-ssim", "7"]) == 0
    assert read_model_file(tmp_path / "ct.pt")["meta"]["loss_weights"] == PAPER_ABLATION.to_dict()
    pet = read_model_file(tmp_path / "pet.pt")["meta"]["loss_weights"]
    assert pet == {**PAPER_EQ5.to_dict(), "ssim": 7.0}


class NotAModel:
    """Any pickled object other than plain data."""


def test_model_files_are_loaded_as_data_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "lightfusion-model/1", "payload": NotAModel()}, path)
    with pytest.raises(ModelError, match="does not load"):
        read_model_file(path)
    (tmp_path / "junk.pt").write_bytes(b"\x00not a model")
    with pytest.raises(ModelError, match="does not load"):
        load_model(tmp_path / "junk.pt", "pet-mri")


def test_init_starts_from_a_models_weights(tmp_path, data):
    train(config(tmp_path, "start.pt", epochs=2))
    train(config(tmp_path, "tuned.pt", epochs=1, lr=1e-12, init=tmp_path / "start.pt"))
    a, b = weights(tmp_path / "start.pt"), weights(tmp_path / "tuned.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert read_model_file(tmp_path / "tuned.pt")["meta"]["recipe"]["init"] == str(tmp_path / "start.pt")
    with pytest.raises(ModelError, match="another network"):
        train(config(tmp_path, "wide.pt", epochs=1, init=tmp_path / "start.pt",
                     network=NetworkConfig(width=16, reduction=4)))


def test_extra_tasks_add_their_pairs_less_their_held_out_cases(tmp_path):
    root = tmp_path / "data"
    make_pairs(root / "PET-MRI")
    make_pairs(root / "CT-MRI", modality="CT", names=("1001", "4001", "4002", "5001"))
    result = train(config(tmp_path, "all.pt", data=root, epochs=1, extra_tasks={"ct-mri": ["5"]}))
    meta = read_model_file(result["out"])["meta"]
    assert meta["train_pairs"] == 4 + 3  # PET less case 3, CT less case 5
    assert meta["recipe"]["extra_tasks"] == {"ct-mri": ["5"]}


def test_study_options_from_the_command_line(tmp_path, data, capsys):
    out = tmp_path / "cli.pt"
    code = main(["train", "--data", str(data), "--task", "pet-mri", "--out", str(out), "--epochs", "1",
                 "--crop", "16", "--width", "8", "--gradient-term", "signed", "--intensity-target", "saliency",
                 "--ssim-window", "7", "--schedule", "cosine", "--rotate", "--jitter", "0.1", "--device", "cpu"])
    assert code == 0
    payload = read_model_file(out)
    assert payload["meta"]["loss_weights"]["gradient_term"] == "signed"
    assert payload["meta"]["loss_weights"]["ssim_window"] == 7
    assert payload["meta"]["recipe"]["schedule"] == "cosine" and payload["meta"]["recipe"]["rotate"]
    assert main(["train", "--data", str(data), "--task", "pet-mri", "--out", str(tmp_path / "x.pt"),
                 "--ssim-window", "8", "--device", "cpu"]) == 2
    assert "SSIM window must be odd" in capsys.readouterr().err


def test_a_cosine_run_resumed_with_more_epochs_follows_the_longer_schedule(tmp_path, data):
    """The cosine schedule depends on the run's length: a checkpoint of a 1-epoch run resumed to 3 epochs
    must give the 3-epoch run's weights (the recursive CosineAnnealingLR resumed at lr 0 instead)."""
    train(config(tmp_path, "full.pt", epochs=3, schedule="cosine"))
    train(config(tmp_path, "part.pt", epochs=1, schedule="cosine"))
    train(config(tmp_path, "part.pt", epochs=3, schedule="cosine", resume=checkpoint_path(tmp_path / "part.pt")))
    assert same(weights(tmp_path / "full.pt"), weights(tmp_path / "part.pt"))
    with open(log_path(tmp_path / "part.pt")) as fh:
        lrs = [float(r["lr"]) for r in csv.DictReader(fh)]
    # the lr set after each epoch: the 1-epoch run's own end (0), then the 3-epoch schedule's
    assert lrs == pytest.approx([0.0, 3e-3 * 0.25, 0.0], abs=1e-12)
