"""Training in separate processes: two ranks under torchrun, a run stopped by SIGTERM, and a
second run refused the folder of one under way."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import torch

from reddino_train.config import load_config
from reddino_train.distributed import LaunchError, local_gpu
from reddino_train.monitor import read_log
from reddino_train.schedules import build_schedules

SCRIPT = Path(__file__).with_name("fit_and_checksum.py")
TIMEOUT_S = 300  # a run of a few steps takes 20-30 s here; CI machines can be twice as slow, and busy
TINY = ["model.layerscale=1.0", "loss.centering=softmax_center", "loss.koleo_weight=0.1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun_fit(data_dir: Path, out_dir: Path | str, steps: int, *overrides: str, check: bool = True):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(SCRIPT), str(data_dir), str(out_dir), str(steps), *TINY, *overrides,
    ]
    launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ended_at_exit(launcher, torchrun=True):
        finished = subprocess.CompletedProcess(command, None, *launcher.communicate(timeout=TIMEOUT_S))
    finished.returncode = launcher.returncode
    if check:
        finished.check_returncode()
    return out_dir if check else finished


@contextmanager
def ended_at_exit(process: subprocess.Popen, *, torchrun: bool = False) -> Iterator[subprocess.Popen]:
    """Kill ``process`` if it still runs when the block ends (a failed test), with its ranks under
    torchrun, which run in sessions of their own: a run left training would slow every later test."""
    try:
        yield process
    finally:
        if process.poll() is None:
            for pid in workers(process).values() if torchrun else ():
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def ddp_run(smear_images, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("ddp")
    torchrun_fit(smear_images, out_dir, 3)
    return torchrun_fit(smear_images, out_dir, 4)  # resumes at 3: rank 0 reads the checkpoint, rank 1 is sent it


@pytest.fixture(scope="module")
def fsdp_run(smear_images, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("fsdp")
    torchrun_fit(smear_images, out_dir, 2, "train.parallel=fsdp")
    return torchrun_fit(smear_images, out_dir, 4, "train.parallel=fsdp")  # resumes at 2: two steps in one process


def test_two_gloo_ranks_keep_student_and_teacher_identical(ddp_run):
    rank0, rank1 = (json.loads((ddp_run / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["iterations_done"] == rank1["iterations_done"] == 4
    assert rank0["student"] == rank1["student"] and rank0["teacher"] == rank1["teacher"]
    assert rank0["student"] != rank0["teacher"]
    checkpoint = torch.load(ddp_run / "checkpoint.pt", weights_only=True)
    assert checkpoint["sampler"] == {"samples_consumed": 4 * 4, "world_size": 2}
    assert len(checkpoint["rng"]) == 2
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])
    rows = read_log(ddp_run / "log.csv")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    # The learning rate is scaled to the global batch of both ranks (DINOv2's square-root rule).
    cfg = load_config("tiny", TINY)
    two, one = build_schedules(cfg, world_size=2), build_schedules(cfg, world_size=1)
    assert [row["lr"] for row in rows] == [two.at(step - 1).lr for step in (1, 2, 3, 4)]
    assert two.at(3).lr == pytest.approx(2**0.5 * one.at(3).lr) and one.at(3).lr > 0


def test_fsdp_shards_and_resumes_yet_trains_like_ddp(ddp_run, fsdp_run):
    rank0, rank1 = (json.loads((fsdp_run / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["teacher"] != rank1["teacher"]  # each rank holds its own shards
    ddp, fsdp = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (ddp_run, fsdp_run))
    for model in ("student", "teacher"):
        assert ddp[model].keys() == fsdp[model].keys()
        for name, tensor in ddp[model].items():
            assert torch.allclose(fsdp[model][name], tensor, rtol=1e-4, atol=1e-5), (model, name)
    # each step gathers the teacher's 2 blocks and root once, and the student's once, though its
    # blocks run twice (global, local crops) before the backward pass; resharding after each use
    # gathered them four times (12 per step). Two steps: the second gathers again only if the
    # first let go of the student's blocks after its backward pass.
    assert rank0["fsdp_all_gathers"] == 6 * rank0["iterations_this_run"] and rank0["iterations_this_run"] == 2
    ddp_log, fsdp_log = read_log(ddp_run / "log.csv"), read_log(fsdp_run / "log.csv")
    assert [row["step"] for row in fsdp_log] == [1, 2, 3, 4]
    assert [row["loss"] for row in fsdp_log] == pytest.approx([row["loss"] for row in ddp_log], rel=1e-5)


@pytest.mark.parametrize("two_process_run", ["ddp_run", "fsdp_run"])
def test_a_two_process_checkpoint_resumes_in_one_process_where_the_data_left_off(
    two_process_run, smear_images, tmp_path, request
):
    run = request.getfixturevalue(two_process_run)
    for name in ("checkpoint.pt", "log.csv"):
        (tmp_path / name).write_bytes((run / name).read_bytes())
    subprocess.run([sys.executable, str(SCRIPT), str(smear_images), str(tmp_path), "6", *TINY],
                   check=True, env=ENV, timeout=TIMEOUT_S, capture_output=True)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == 6
    # The two ranks took 4 batches of 4 from one shared order; one process goes on after those 32.
    assert checkpoint["sampler"] == {"samples_consumed": 2 * 4 * 4 + 2 * 4, "world_size": 1}
    assert len(checkpoint["rng"]) == 1
    assert [row["step"] for row in read_log(tmp_path / "log.csv")] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_resumes_under_the_other_parallel_mode_as_under_its_own(ddp_run, fsdp_run, smear_images,
                                                                             tmp_path):
    """A run moved from replicated (ddp) to sharded (fsdp) models, or back, when the model
    outgrows a GPU or a smaller cluster has more memory per GPU: both checkpoints hold whole
    tensors, so the next steps train as if the mode had never changed."""
    continued = {}
    for source, parallel in ((ddp_run, "ddp"), (ddp_run, "fsdp"), (fsdp_run, "ddp")):
        out_dir = tmp_path / f"{source.name}-{parallel}"
        out_dir.mkdir()
        for name in ("checkpoint.pt", "log.csv"):
            (out_dir / name).write_bytes((source / name).read_bytes())
        torchrun_fit(smear_images, out_dir, 6, f"train.parallel={parallel}")
        assert json.loads((out_dir / "rank0.json").read_text())["iterations_this_run"] == 2
        continued[source.name, parallel] = out_dir
    reference = torch.load(continued[ddp_run.name, "ddp"] / "checkpoint.pt", weights_only=True)
    reference_log = read_log(continued[ddp_run.name, "ddp"] / "log.csv")
    for run in (continued[ddp_run.name, "fsdp"], continued[fsdp_run.name, "ddp"]):
        checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
        assert checkpoint["iteration"] == 6
        assert checkpoint["sampler"] == reference["sampler"]
        for model in ("student", "teacher"):
            for name, tensor in reference[model].items():
                assert torch.allclose(checkpoint[model][name], tensor, rtol=1e-4, atol=1e-5), (run.name, model, name)
        log = read_log(run / "log.csv")
        assert [row["step"] for row in log] == [1, 2, 3, 4, 5, 6]
        assert [row["loss"] for row in log] == pytest.approx([row["loss"] for row in reference_log], rel=1e-5)


def wait_for_steps(process: subprocess.Popen, log: Path, steps: int, timeout_s: float = TIMEOUT_S) -> None:
    """Wait until the run of ``process`` has logged ``steps`` steps; fail if it ends or takes too long."""
    deadline = time.monotonic() + timeout_s
    while not (log.exists() and len(log.read_text().splitlines()) > steps):
        assert process.poll() is None, f"the run ended (exit status {process.returncode}) before step {steps}"
        assert time.monotonic() < deadline, f"the run made no {steps} steps in {timeout_s:.0f} s"
        time.sleep(0.1)


def test_a_second_run_on_the_folder_is_refused_and_sigterm_ends_the_first_with_a_checkpoint(smear_images, tmp_path):
    command = [sys.executable, str(SCRIPT), str(smear_images), str(tmp_path), "1000", *TINY, "optim.epochs=200"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "log.csv"
    with ended_at_exit(process):
        wait_for_steps(process, log, 2)  # the run holds the folder and trains
        second = torchrun_fit(smear_images, tmp_path, 2000, check=False)  # refused on both ranks, the run goes on
        assert second.returncode != 0
        assert second.stderr.count(f"{tmp_path} is in use by another reddino-train fit (pid {process.pid} on ") >= 2
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, output
    summary = json.loads((tmp_path / "rank0.json").read_text())
    assert summary["stopped_by_signal"] and 2 <= summary["iterations_done"] < 1000
    assert f"stopped by signal after step {summary['iterations_done']}" in output
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == summary["iterations_done"]
    assert read_log(log)[-1]["step"] == summary["iterations_done"]


def workers(launcher: subprocess.Popen) -> dict[int, int]:
    """The pids of the workers that torchrun (``launcher``) started, by rank. They run in
    sessions of their own, so a signal to the launcher's group does not reach them."""
    ranks = {}
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        try:
            entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        environ = dict(entry.split(b"=", 1) for entry in entries if b"=" in entry)
        if b"RANK" in environ:  # an ended worker (a zombie) shows no environment
            ranks[int(environ[b"RANK"])] = int(pid)
    return ranks


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_with_one_checkpoint(smear_images, tmp_path):
    """A scheduler may signal one node's processes before another's: the ranks must still agree."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(smear_images), str(tmp_path), "1000", *TINY, "optim.epochs=200"]
    launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with ended_at_exit(launcher, torchrun=True):  # a rank left waiting for the other would outlive the test
        wait_for_steps(launcher, tmp_path / "log.csv", 2)
        os.kill(workers(launcher)[1], signal.SIGTERM)
        output, _ = launcher.communicate(timeout=TIMEOUT_S)
    assert launcher.returncode == 0, output
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["stopped_by_signal"] and rank1["stopped_by_signal"]
    assert rank0["iterations_done"] == rank1["iterations_done"] < 1000
    assert rank0["student"] == rank1["student"] and rank0["teacher"] == rank1["teacher"]
    assert f"stopped by signal after step {rank0['iterations_done']}" in output
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == rank0["iterations_done"]
    assert read_log(tmp_path / "log.csv")[-1]["step"] == rank0["iterations_done"]


def test_ranks_that_do_not_share_the_output_folder_stop_together_at_the_start_saying_why(smear_images, tmp_path):
    """Each node writing to its own disk: found before the first step, not at the resume."""
    finished = torchrun_fit(smear_images, f"{tmp_path}/rank{{rank}}", 2, check=False)
    assert finished.returncode != 0
    assert (f"{tmp_path}/rank0 is not one folder shared by every rank: rank 1 does not see what rank 0 writes "
            "there; give --out a folder on a file system that every node mounts") in finished.stderr
    assert sorted(path.name for path in (tmp_path / "rank0").iterdir()) == [".reddino-train.lock"]
    assert not (tmp_path / "rank1" / "checkpoint.pt").exists()


def test_a_data_folder_missing_on_one_node_stops_every_rank_saying_which(smear_images, tmp_path):
    (tmp_path / "data0").symlink_to(smear_images)  # rank 0's images; rank 1's folder, data1, is missing
    finished = torchrun_fit(f"{tmp_path}/data{{rank}}", tmp_path / "out", 1, check=False)
    assert finished.returncode != 0
    assert f"rank 1: data folder {tmp_path}/data1 does not exist" in finished.stderr
    assert "rank 0:" not in finished.stderr  # rank 0 has its images and says so by silence


def test_data_folders_with_as_many_but_other_images_stop_every_rank(smear_images, tmp_path):
    (tmp_path / "data0").symlink_to(smear_images)
    other = shutil.copytree(smear_images, tmp_path / "data1")
    first = sorted(other.rglob("*.png"))[0]
    first.rename(first.with_name(f"renamed-{first.name}"))  # as many images, one of them another file
    finished = torchrun_fit(f"{tmp_path}/data{{rank}}", tmp_path / "out", 1, check=False)
    assert finished.returncode != 0
    assert re.search(r"the ranks disagree on the training images \(rank 0: 16 images \((\w{8})\), rank 1: 16 "
                     r"images \((?!\1)\w{8}\)\); is the data folder still being filled", finished.stderr)


def test_the_cli_stopped_by_ctrl_c_exits_130_and_says_how_to_resume(smear_images, tmp_path):
    command = [sys.executable, "-c", "import sys; from reddino_train.cli import main; sys.exit(main(sys.argv[1:]))",
               "fit", "tiny", str(smear_images), "--out", str(tmp_path), *TINY, "optim.epochs=200", "--max-steps", "5000"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ended_at_exit(process):
        wait_for_steps(process, tmp_path / "log.csv", 1)  # its stop handler is in place before its first step
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 130, errors
    assert "SIGINT: stopping after this step with a checkpoint; Ctrl-C again stops at once, without one" in errors
    assert f"checkpoint in {tmp_path}; the same command resumes it; so does reddino-train fit " \
           f"{tmp_path}/config.yaml {smear_images} --out {tmp_path} --max-steps 5000, with the run's own settings" \
           in errors
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] >= 1


def test_each_process_takes_its_own_gpu_or_says_why_it_cannot():
    assert local_gpu({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}, gpu_count=4) == 1
    assert local_gpu({"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8"}, gpu_count=1) == 0  # srun --gpus-per-task=1
    assert local_gpu({}, gpu_count=4) == 0  # one process, no launcher
    with pytest.raises(LaunchError, match=r"LOCAL_RANK is not, so every process of a node would take its first of 4"):
        local_gpu({"RANK": "3", "WORLD_SIZE": "8"}, gpu_count=4)
    with pytest.raises(LaunchError, match=r"LOCAL_RANK is 4 but this process sees 4 GPUs \(0-3\)"):
        local_gpu({"RANK": "4", "LOCAL_RANK": "4", "WORLD_SIZE": "8"}, gpu_count=4)
    for local_rank in ("0", "1"):  # torchrun --nproc-per-node 2 on a node with one GPU: every process refuses
        with pytest.raises(LaunchError, match=r"^torchrun started 2 processes on this node, but each sees one GPU"):
            local_gpu({"RANK": local_rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
                      gpu_count=1)
    # ... unless a wrapper shows each its own: torchrun ... bash -c 'CUDA_VISIBLE_DEVICES=$LOCAL_RANK python ...'
    assert local_gpu({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                      "CUDA_VISIBLE_DEVICES": "1"}, gpu_count=1) == 0

