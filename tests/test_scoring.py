"""score_importance: equals compute_importance, shards over processes, resumes after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import models
import pytest
import torch

from optimum_lrpqvit import compute_importance
from optimum_lrpqvit.data import images_to_pixel_values, load_image_dataset
from optimum_lrpqvit.scores import read_scores, write_scores
from optimum_lrpqvit.scoring import score_importance

N_IMAGES = 40
REFERENCE_VIT = Path(__file__).resolve().parents[1] / "reference_models" / "vit-fashion-mnist"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return models.save_checkpoint(models.hf_vit(), tmp_path_factory.mktemp("float") / "vit")


@pytest.fixture(scope="module")
def images():
    return load_image_dataset("fashion_mnist", "train", num_samples=N_IMAGES, seed=3)


def _cli(*args, env=None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "optimum_lrpqvit.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _score_args(checkpoint, output, *extra):
    return ("score", checkpoint, "--dataset", "fashion_mnist", "--num-samples", str(N_IMAGES), "--seed", "3",
            "--batch-size", "4", "--output", str(output), *extra)


def test_scores_equal_compute_importance_on_the_same_images(images):
    model, processor = models.hf_vit(), models.processor_for(models.hf_vit())
    pixels = images_to_pixel_values([row["image"] for row in images], processor, 3)
    expected = compute_importance(model, pixels, batch_size=8)
    scores = score_importance(model, images, processor, batch_size=6, progress=False)
    assert list(scores) == list(expected)
    torch.testing.assert_close(torch.tensor(list(scores.values())), torch.tensor(list(expected.values())),
                               rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\]"):  # 10 Fashion-MNIST classes, 5 logits
        score_importance(model, images, processor, use_labels=True, progress=False)
    images = images.map(lambda row: {"label": row["label"] % models.NUM_LABELS})
    labels = torch.tensor(images["label"])
    with_labels = score_importance(model, images, processor, batch_size=6, use_labels=True, progress=False)
    expected = compute_importance(model, pixels, targets=labels)
    torch.testing.assert_close(torch.tensor(list(with_labels.values())), torch.tensor(list(expected.values())),
                               rtol=1e-5, atol=1e-9)


def test_a_streamed_dataset_gives_the_same_scores(images):
    model, processor = models.hf_vit(), models.processor_for(models.hf_vit())
    expected = score_importance(model, images, processor, batch_size=8, progress=False)
    streamed = score_importance(model, images.to_iterable_dataset(), processor, batch_size=8, progress=False)
    assert list(streamed) == list(expected)
    torch.testing.assert_close(torch.tensor(list(streamed.values())), torch.tensor(list(expected.values())),
                               rtol=1e-12, atol=0)


def test_resume_skips_done_batches_and_rejects_another_job(images, tmp_path):
    model, processor = models.hf_vit(), models.processor_for(models.hf_vit())
    full = score_importance(model, images, processor, batch_size=4, checkpoint_dir=tmp_path, checkpoint_every=2,
                            output=tmp_path / "a.json", progress=False)
    # the finished checkpoint is a resume point too: nothing is recomputed and the scores are identical
    again = score_importance(model, images, processor, batch_size=4, checkpoint_dir=tmp_path, checkpoint_every=2,
                             output=tmp_path / "b.json", progress=False)
    assert again == full
    assert json.loads((tmp_path / "b.json").read_text())["metadata"]["resumed_at_batch"] == N_IMAGES // 4
    with pytest.raises(ValueError, match="different job"):
        score_importance(model, images, processor, batch_size=5, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different job"):
        score_importance(models.hf_vit(seed=1), images, processor, batch_size=4, checkpoint_dir=tmp_path,
                         progress=False)
    (tmp_path / "rank0-of-1.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="unreadable"):
        score_importance(model, images, processor, batch_size=4, checkpoint_dir=tmp_path, progress=False)


def test_scores_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "scores.json"
    write_scores(path, {"a": 0.25, "b": 0.75}, {"model": "m"})
    assert read_scores(path) == {"a": 0.25, "b": 0.75}
    path.write_text(path.read_text()[:30])
    with pytest.raises(ValueError, match="not valid JSON"):
        read_scores(path)
    write_scores(path, {"a": 0.5, "b": 0.75}, {})
    with pytest.raises(ValueError, match="sum to"):
        read_scores(path)
    path.write_text(json.dumps({"scores": {"a": 1.0}}))
    with pytest.raises(ValueError, match="not an optimum-lrpqvit importance file"):
        read_scores(path)
    with pytest.raises(FileNotFoundError, match="lrpqvit score"):
        read_scores(tmp_path / "missing.json")


def test_killed_scoring_job_resumes_to_the_uninterrupted_scores(tmp_path):
    checkpoint = str(REFERENCE_VIT)  # slow enough (~0.2 s a batch) to be killed part-way
    uninterrupted = _cli(*_score_args(checkpoint, tmp_path / "full.json"))
    out, _ = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, out
    ckpt = tmp_path / "ckpt"
    job = _cli(*_score_args(checkpoint, tmp_path / "resumed.json", "--checkpoint-dir", str(ckpt),
                            "--checkpoint-every", "1"), start_new_session=True)
    deadline = time.time() + 240
    while not (ckpt / "rank0-of-1.safetensors").exists():  # kill it once it has saved something
        assert job.poll() is None and time.time() < deadline, job.communicate()[0]
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (tmp_path / "resumed.json").exists()
    resumed = _cli(*_score_args(checkpoint, tmp_path / "resumed.json", "--checkpoint-dir", str(ckpt),
                                "--checkpoint-every", "1"))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    document = json.loads((tmp_path / "resumed.json").read_text())
    assert 1 <= document["metadata"]["resumed_at_batch"] < N_IMAGES // 4
    assert document["scores"] == json.loads((tmp_path / "full.json").read_text())["scores"]


def test_two_processes_give_the_scores_of_one(checkpoint, tmp_path):
    single = _cli(*_score_args(checkpoint, tmp_path / "one.json"))
    out, _ = single.communicate(timeout=300)
    assert single.returncode == 0, out
    # torchrun sets RANK / WORLD_SIZE; accelerate's Accelerator picks them up (gloo on CPU)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "optimum_lrpqvit.cli", *_score_args(checkpoint, tmp_path / "two.json", "--checkpoint-dir",
                                                         str(tmp_path / "ckpt"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["metadata"]["processes"] == 2 and two["metadata"]["num_images"] == N_IMAGES
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["rank0-of-2.safetensors", "rank1-of-2.safetensors"]
    one = json.loads((tmp_path / "one.json").read_text())["scores"]
    assert list(two["scores"]) == list(one)
    torch.testing.assert_close(torch.tensor(list(two["scores"].values()), dtype=torch.float64),
                               torch.tensor(list(one.values()), dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_scoring_streams_a_hub_dataset_by_id(checkpoint, images, tmp_path, local_hub):
    """`lrpqvit score --dataset namespace/name` streams a parquet dataset repo over HTTP, like ImageNet on the Hub."""
    from datasets import load_dataset
    from huggingface_hub import HfApi

    from optimum_lrpqvit.data import prepare_image_dataset

    images.to_parquet(tmp_path / "train.parquet")
    api = HfApi(endpoint=local_hub.url, token="test-token")
    api.create_repo("tester/fashion-sample", repo_type="dataset")
    api.upload_file(path_or_fileobj=tmp_path / "train.parquet", path_in_repo="data/train-00000-of-00001.parquet",
                    repo_id="tester/fashion-sample", repo_type="dataset")
    env = {"HF_ENDPOINT": local_hub.url, "HF_TOKEN": "test-token", "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    job = _cli("score", checkpoint, "--dataset", "tester/fashion-sample", "--num-samples", "24", "--batch-size", "8",
               "--output", str(tmp_path / "scores.json"), env=env)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out
    # the same seeded stream, read locally
    local = prepare_image_dataset(load_dataset("parquet", data_files=str(tmp_path / "train.parquet"), split="train",
                                               streaming=True), num_samples=24, seed=0)
    expected = score_importance(models.hf_vit(), local, models.processor_for(models.hf_vit()), batch_size=8,
                                progress=False)
    scores = json.loads((tmp_path / "scores.json").read_text())["scores"]
    torch.testing.assert_close(torch.tensor(list(scores.values())), torch.tensor(list(expected.values())),
                               rtol=1e-6, atol=0)
