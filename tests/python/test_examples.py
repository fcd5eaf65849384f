"""Every program in examples/ runs with small arguments and says what it should: the main job
trains, is preempted and resumes to the same weights; the other examples check their own
results (same batches, complete checkpoints, identical replicas, a rendezvous of two nodes).
No timing is asserted: the speeds they print go to the reader, not to these tests."""

import importlib.util
import os
import re
import subprocess
import sys
import uuid

import pytest

import threadloom
from conftest import ROOT, run_python

EXAMPLES = os.path.join(ROOT, "examples")
# A small main job on 8 sim devices: 15 epochs of a 600-sample data set (4 steps each), a
# 4096 x 8 embedding table, 0.5 ms kernels.
SMALL_JOB = ["--devices", "sim:8", "--steps", "60", "--ckpt-every", "20", "--samples", "600",
             "--batch-size", "16", "--lr", "8", "--buckets", "4096", "--dim", "8", "--tokens", "6",
             "--kernel-ms", "0.5", "--log-every", "1000"]


def example(*args, env_extra=None):
    return run_python(os.path.join(EXAMPLES, args[0]), *args[1:], env_extra=env_extra)


def load_example(name):
    spec = importlib.util.spec_from_file_location("example_" + name[:-3],
                                                  os.path.join(EXAMPLES, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def steps_in(directory):
    with threadloom.Checkpointer(directory) as c:
        return c.steps()


# -- the main job ------------------------------------------------------------------------------

def test_main_job_preempted_and_resumed_ends_with_the_uninterrupted_weights(tmp_path):
    ref, job = str(tmp_path / "ref"), str(tmp_path / "job")
    p = example("main_job.py", "--ckpt-dir", ref, *SMALL_JOB)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.startswith("main_job: path: sim:8, 8 simulated devices"), out   # the first line
    assert "no checkpoint in %s: starting at step 0" % ref in out
    assert "the 8 replicas are identical" in out
    for k in range(8):     # per device: engines busy, waits for data
        assert re.search(r"^summary: sim:%d +compute +[0-9.]+%% +h2d +[0-9.]+%% +d2h +[0-9.]+%% "
                         r"busy; waited [0-9.]+ s for data$" % k, out, re.M), out
    assert re.search(r"H2D [0-9.]+[kMG]?B/s \(the ranks waited [0-9]+% of the time", out), out
    assert re.search(r"summary: 3 checkpoint\(s\) of [0-9.]+ MB: training stalled", out)
    m = re.search(r"summary: loss ([0-9.]+) at the first step -> ([0-9.]+)", out)
    assert m and float(m.group(2)) < float(m.group(1)), out
    assert re.search(r"^step 60/60 .* H2D .* waited for data .* devices: compute ", out,
                     re.M), out                               # plain status lines (no TTY)
    assert steps_in(ref) == [20, 40, 60]
    ref_sha = re.search(r"weights at step 60: sha256 ([0-9a-f]+)", out).group(1)

    p = example("main_job.py", "--ckpt-dir", job, "--preempt-at", "25", *SMALL_JOB)
    assert p.returncode == 75, (p.stdout, p.stderr)
    assert "SIGUSR2: every rank stops at the next step and saves a checkpoint" in p.stdout
    assert "preempted: stopped at step 26 with checkpoint step-26 complete" in p.stdout
    assert steps_in(job) == [20, 26]
    assert threadloom.load(job)["step"] == 26

    p = example("main_job.py", "--ckpt-dir", job, "--check-against", ref, *SMALL_JOB)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "resuming from step-26 in %s" % job in p.stdout
    assert "steps 26 -> 60" in p.stdout
    assert "check: final weights IDENTICAL to the uninterrupted run's" in p.stdout
    assert "weights at step 60: sha256 %s" % ref_sha in p.stdout

    # Run again: nothing left to train, and the weights still match.
    p = example("main_job.py", "--ckpt-dir", job, "--check-against", ref, *SMALL_JOB)
    assert p.returncode == 0 and "nothing to train" in p.stdout and "IDENTICAL" in p.stdout


def test_main_job_killed_resumes_from_the_newest_complete_checkpoint(tmp_path):
    ref, job = str(tmp_path / "ref"), str(tmp_path / "job")
    assert example("main_job.py", "--ckpt-dir", ref, *SMALL_JOB).returncode == 0
    p = example("main_job.py", "--ckpt-dir", job, "--kill-at", "50", *SMALL_JOB)
    assert p.returncode == -9, (p.stdout, p.stderr)
    assert "simulating a crash: SIGKILL" in p.stdout
    saved = steps_in(job)               # whatever had committed when the kill came (20, 40?)
    assert saved and set(saved) <= {20, 40}
    p = example("main_job.py", "--ckpt-dir", job, "--check-against", ref, *SMALL_JOB)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "resuming from step-%d" % max(saved) in p.stdout
    assert "IDENTICAL" in p.stdout


def test_main_job_refuses_checkpoints_written_with_other_settings(tmp_path):
    d = str(tmp_path / "job")
    assert example("main_job.py", "--ckpt-dir", d, *SMALL_JOB).returncode == 0
    p = example("main_job.py", "--ckpt-dir", d, *SMALL_JOB, "--dim", "4")
    assert p.returncode != 0
    assert "written with other settings (dim=8)" in p.stderr
    assert "use the same settings or another --ckpt-dir" in p.stderr


@pytest.mark.gpu
def test_main_job_on_gpus_preempted_and_resumed(tmp_path, require_gpu):
    """The same job on the GPUs (cuda: NCCL, the cudart feeder, spin kernels): preempted and
    resumed to the uninterrupted run's weights."""
    assert SMALL_JOB[:2] == ["--devices", "sim:8"]
    job_args = ["--devices", "cuda"] + SMALL_JOB[2:]
    ref, job = str(tmp_path / "ref"), str(tmp_path / "job")
    p = example("main_job.py", "--ckpt-dir", ref, *job_args)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert p.stdout.startswith("main_job: path: %d cuda device(s)" % require_gpu), p.stdout
    assert "replicas are identical" in p.stdout
    p = example("main_job.py", "--ckpt-dir", job, "--preempt-at", "25", *job_args)
    assert p.returncode == 75, (p.stdout, p.stderr)
    p = example("main_job.py", "--ckpt-dir", job, "--check-against", ref, *job_args)
    assert p.returncode == 0 and "IDENTICAL" in p.stdout, (p.stdout, p.stderr)


def test_main_job_exception_in_one_rank_ends_the_job(tmp_path):
    """A rank raising ends the job with that error (status 1, no hang: run_python's timeout),
    every thread stopped, the checkpoint before it still loadable."""
    d = str(tmp_path / "job")
    p = example("main_job.py", "--ckpt-dir", d, "--fail-at", "30", "--fail-rank", "3", *SMALL_JOB)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert ("main_job: FAILED: RuntimeError: main_job: --fail-at: rank 3 raises after step 30 "
            "(a simulated bug) (raised in threadloom.spmd rank 3 of 8 (device sim:3))") in p.stderr
    assert steps_in(d) == [20]
    assert threadloom.load(d)["step"] == 20


def test_main_job_failing_device_ends_the_job(tmp_path):
    d = str(tmp_path / "job")
    p = example("main_job.py", "--ckpt-dir", d, "--lose-device-at", "30", "--fail-rank", "5",
                *SMALL_JOB)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "simulating a failing device: sim:5 is lost after step 30" in p.stdout
    assert "main_job: FAILED: DeviceLostError: TL_EDEVLOST" in p.stderr
    assert "sim:5 is lost" in p.stderr and "rank 5 of 8 (device sim:5)" in p.stderr
    assert steps_in(d) == [20]


def test_main_job_says_which_path_runs():
    mj = load_example("main_job.py")
    why = "default: no usable GPU (TL_ENODRIVER: cudaGetDeviceCount: test)"
    devs, line = mj.choose_devices("auto", backend=lambda: {"name": "none", "count": 0,
                                                            "why": why})
    assert [str(d) for d in devs] == ["sim:%d" % i for i in range(8)]
    assert line.startswith("path: sim:8, 8 simulated devices") and ("no GPU here (%s)" % why) in line
    devs, line = mj.choose_devices("sim:3")
    assert len(devs) == 3 and "no GPU here" not in line
    with pytest.raises(SystemExit, match="use auto, sim:N or cuda"):
        mj.choose_devices("tpu")
    with pytest.raises(SystemExit, match="only 8 sim devices"):
        mj.choose_devices("sim:9")


# -- the other examples ------------------------------------------------------------------------

def test_free_threads_example():
    p = example("free_threads.py", "--items", "2000", "--threads", "2")
    assert p.returncode == 0, p.stderr
    gil = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
    assert ("GIL %s" % ("ENABLED" if gil else "disabled")) in p.stdout
    assert re.search(r"without share: .* speed-up [0-9.]+x on 2 thread", p.stdout), p.stdout
    assert re.search(r"with share   : .* speed-up [0-9.]+x on 2 thread", p.stdout), p.stdout
    if not gil:  # the shared list and its strings, made immortal between the two rounds
        assert re.search(r"threadloom.share: \d+ object\(s\) made immortal", p.stdout), p.stdout


def test_dataloader_before_and_after_deliver_the_same_batches():
    p = example("dataloader_threads.py", "--samples", "500", "--workers", "2", "--epochs", "2")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "same batches in the same order: True" in out
    assert re.search(r"^(ProcessLoader|torch\.utils\.data\.DataLoader).*epoch 1: +\d+ samples/s",
                     out, re.M), out
    assert re.search(r"^threadloom\.data\.DataLoader \(threads\) +epoch 1: +\d+ samples/s", out,
                     re.M), out
    assert len(re.findall(r"epoch 2: +\d+ samples/s", out)) == 2


def test_vision_pipeline_example_same_batches_with_worker_threads(tmp_path):
    p = example("vision_pipeline.py", "--images", "8", "--samples", "96", "--workers", "2",
                "--batch-size", "16", "--dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "same batches as in the loop: yes" in p.stdout, p.stdout
    assert re.search(r"^a batch: images float32 \(16, 3, 224, 224\) .*labels int64 \(16,\)$",
                     p.stdout, re.M), p.stdout
    assert sorted(os.listdir(str(tmp_path))) == ["img%05d.jpg" % k for k in range(8)]


def test_vision_pipeline_sample_is_a_normalized_crop_of_the_decoded_image(tmp_path):
    """Each sample, un-normalized, is a 224 x 224 window of its decoded JPEG (flipped or not),
    the same for one seed and different for another; the images are the same bytes each time."""
    np = pytest.importorskip("numpy")
    from PIL import Image
    vp = load_example("vision_pipeline.py")
    paths = vp.write_jpegs(str(tmp_path / "a"), 3, seed=5)
    again = vp.write_jpegs(str(tmp_path / "b"), 3, seed=5)
    assert [open(x, "rb").read() for x in paths] == [open(x, "rb").read() for x in again]
    ds = vp.JpegImages(paths, n=12, seed=1)
    flips = set()
    for i in range(12):
        x, label = ds[i]
        assert x.dtype == np.float32 and x.shape == (3, 224, 224) and label == i % 10
        rgb = np.rint((x.transpose(1, 2, 0) * vp.STD + vp.MEAN) * 255).astype(np.int16)
        with Image.open(paths[i % 3]) as img:
            full = np.asarray(img.convert("RGB"), dtype=np.int16)
        found = [(ox, oy, f) for f in (False, True) for oy in range(full.shape[0] - 223)
                 for ox in range(full.shape[1] - 223)
                 if abs(int(full[oy, ox + (223 if f else 0), 0]) - int(rgb[0, 0, 0])) <= 1
                 and np.abs((full[oy:oy + 224, ox:ox + 224, :][:, ::-1] if f else
                             full[oy:oy + 224, ox:ox + 224, :]) - rgb).max() <= 1]
        assert len(found) >= 1, i
        flips.add(found[0][2])
        assert np.array_equal(ds[i][0], x)                      # the same sample every time
    assert flips == {False, True}                               # 12 samples: both happen
    other = vp.JpegImages(paths, n=12, seed=2)
    assert any(not np.array_equal(other[i][0], ds[i][0]) for i in range(12))
    with pytest.raises(IndexError):
        ds[12]
    with pytest.raises(ValueError, match="no image files"):
        vp.JpegImages([])


def test_async_checkpoint_example(tmp_path):
    p = example("async_checkpoint.py", "--state-mb", "2", "--steps", "20", "--every", "5",
                "--work", "2000", "--dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("newest checkpoint: step-20, weights[0] = 20: matches its step") == 2
    assert re.search(r"^sync : loop [0-9.]+ s, stall per save", p.stdout, re.M)
    assert re.search(r"^async: loop [0-9.]+ s, stall per save .*; \d+ step\(s\) ran while",
                     p.stdout, re.M)
    for mode in ("sync", "async"):
        assert steps_in(str(tmp_path / mode)) == [15, 20]        # keep=2


def test_train_torch_example_runs_or_says_why_not():
    p = example("train_torch.py", "--steps", "30")
    assert p.returncode == 0, p.stderr
    if importlib.util.find_spec("torch") is None:
        assert p.stdout.startswith("train_torch: skipped: torch is not importable by")
    else:
        assert "replicas identical: True" in p.stdout


def test_slurm_example_two_nodes_meet_and_shard():
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # no SLURM here
    full.update(THREADLOOM_JOB_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex,
                THREADLOOM_JOB_ID="test-examples-%s" % uuid.uuid4().hex)
    script = os.path.join(EXAMPLES, "slurm", "train.py")
    procs = [subprocess.Popen([sys.executable, script, "--nnodes", "2", "--node-rank", str(r),
                               "--master", "127.0.0.1", "--steps", "20", "--timeout", "60"],
                              env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    seeds = set()
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err
        assert re.search(r"^node %d/2 on .*RANK=%d WORLD_SIZE=2" % (r, r), out, re.M), out
        m = re.search(r"^node %d: 2 rank thread\(s\) trained 20 steps on seed (\d+)" % r, out,
                      re.M)
        assert m, out
        seeds.add(m.group(1))
    assert len(seeds) == 1                                   # node 0's seed reached node 1

    sbatch = os.path.join(EXAMPLES, "slurm", "job.sbatch")
    assert subprocess.run(["bash", "-n", sbatch]).returncode == 0
    text = open(sbatch).read()
    assert "#SBATCH --ntasks-per-node=1" in text
    assert re.search(r'^srun --ntasks-per-node=1 .*"\$THREADLOOM" run examples/slurm/train.py',
                     text, re.M)
