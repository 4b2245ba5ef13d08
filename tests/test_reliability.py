"""Bad input is refused before any work is done, and nothing outside a directory is published."""

import os

import models
import pytest

from optimum_lrpqvit import LRPQConfig, quantize, score_importance
from optimum_lrpqvit.cli import main as cli_main
from optimum_lrpqvit.hub import push_directory, save_quantized_model

RESULTS = {"dataset": "fashion_mnist", "split": "test", "num_images": 4, "full_precision": {"top1": 50.0},
           "quantized": {"top1": 50.0, "agreement": 100.0, "kl": 0.0}}


@pytest.fixture(scope="module")
def mixed():
    return quantize(models.hf_vit(), LRPQConfig(mixed_precision=True, allocation="budget", importance="random"),
                    models.images(8))


def test_scoring_destinations_are_checked_before_scoring(tmp_path):
    def never(*args, **kwargs):
        raise AssertionError("the dataset was read")

    with pytest.raises(FileNotFoundError, match="does not exist; create .*missing first"):
        score_importance(models.hf_vit(), never, None, output=tmp_path / "missing" / "scores.json")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        score_importance(models.hf_vit(), never, None, output=tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="checkpoint_dir .* is not a directory"):
        score_importance(models.hf_vit(), never, None, checkpoint_dir=tmp_path / "file")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 2.5"):
        score_importance(models.hf_vit(), never, None, batch_size=2.5)


def test_results_without_their_keys_are_refused_before_writing(mixed, tmp_path):
    with pytest.raises(ValueError, match=r"results lacks \['dataset'"):
        save_quantized_model(mixed, tmp_path / "out", results={"split": "test"})
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        save_quantized_model(mixed, tmp_path / "file")


def test_a_second_save_leaves_no_stale_results_or_figure(mixed, tmp_path):
    save_quantized_model(mixed, tmp_path, results=RESULTS)
    assert {"results.json", "importance.png"} <= set(os.listdir(tmp_path))
    fixed = quantize(models.hf_vit(), LRPQConfig(), models.images(8))
    save_quantized_model(fixed, tmp_path)  # no results, no importance this time
    assert not {"results.json", "importance.png"} & set(os.listdir(tmp_path))


def test_push_refuses_symbolic_links_before_contacting_the_hub(mixed, tmp_path, monkeypatch):
    save_quantized_model(mixed, tmp_path / "out", results=RESULTS)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the directory")
    (tmp_path / "out" / "notes.txt").symlink_to(secret)
    monkeypatch.setattr("optimum_lrpqvit.hub.HfApi", None)  # any use of the Hub client would raise TypeError
    with pytest.raises(ValueError, match="symbolic links .*notes.txt"):
        push_directory(tmp_path / "out", "user/repo", token="x")


def test_cli_quantize_into_a_file_fails_before_quantizing(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code = cli_main(["quantize", str(tmp_path / "nowhere-model"), str(tmp_path / "file")])
    err = capsys.readouterr().err
    assert code == 1 and "output_dir" in err and "is not a directory" in err  # before the (missing) model is read
