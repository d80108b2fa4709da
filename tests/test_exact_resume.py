"""The pieces of exact resume and atomic checkpoints, fast: the resumable train stream, per-step
seeding, and saves that a kill cannot half-write. (End to end with kills: test_fault_tolerance.)"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.utils.data as torchdata

from dk_detectron2.checkpoint import DKCheckpointer, atomic_write
from dk_detectron2.checkpoint.atomic import temporary_path
from dk_detectron2.engine.resumable_loader import ResumableBatches, build_resumable_train_loader


def _dicts(n=7, portrait=()):
    return [
        {"image_id": i, "width": 30 if i in portrait else 40, "height": 40 if i in portrait else 30}
        for i in range(n)
    ]


def _mapper(d):
    """A mapper with random augmentation from the global generators (as Detectron2's are)."""
    return {"image_id": d["image_id"], "noise": torch.rand(2), "flip": bool(torch.rand(()) < 0.5)}


def _take(batches, n, num_workers=0):
    loader = torchdata.DataLoader(
        batches,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=lambda b: b,
        generator=torch.Generator().manual_seed(0),
    )
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out


def _same(a, b):
    return [d["image_id"] for d in a] == [d["image_id"] for d in b] and all(
        torch.equal(x["noise"], y["noise"]) for x, y in zip(a, b)
    )


@pytest.mark.parametrize("portrait", [(), (1, 4, 5)])
def test_batch_i_is_the_same_when_the_stream_starts_at_i(portrait):
    batches = ResumableBatches(_dicts(portrait=portrait), _mapper, batch_size=2, seed=3)
    full = _take(batches, 8)
    batches.start_batch = 5
    resumed = _take(batches, 3)
    assert all(_same(a, b) for a, b in zip(full[5:], resumed))
    if portrait:  # aspect-ratio grouping: each batch is all landscape or all portrait
        for batch in full:
            assert len({d["image_id"] in portrait for d in batch}) == 1


def test_workers_deliver_the_batches_of_the_main_process_in_order():
    batches = ResumableBatches(_dicts(), _mapper, batch_size=2, seed=3)
    batches.start_batch = 1
    assert all(_same(a, b) for a, b in zip(_take(batches, 6), _take(batches, 6, num_workers=2)))


def test_the_stream_depends_on_seed_and_rank_and_leaves_global_generators_alone():
    state = torch.random.get_rng_state()
    a = _take(ResumableBatches(_dicts(), _mapper, 2, seed=3), 4)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = _take(ResumableBatches(_dicts(), _mapper, 2, seed=4), 4)
    rank1 = _take(ResumableBatches(_dicts(), _mapper, 2, seed=3, rank=1, world_size=2), 4)
    assert not all(_same(x, y) for x, y in zip(a, b))
    assert not all(_same(x, y) for x, y in zip(a, rank1))


def test_the_loader_checks_the_batch_size_against_the_processes():
    with pytest.raises(
        ValueError,
        match=r"SOLVER.IMS_PER_BATCH \(3\) must be divisible by the " r"number of processes \(2\)",
    ):
        build_resumable_train_loader(
            _dicts(), _mapper, total_batch_size=3, seed=0, rank=0, world_size=2
        )


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(world_size=0), "world_size must be >= 1, got 0"),
    (dict(rank=2, world_size=2), r"rank must be in \[0, world_size\) = \[0, 2\), got 2"),
    (dict(rank=-1, world_size=2), r"rank must be in \[0, world_size\) = \[0, 2\), got -1"),
])
def test_the_stream_rejects_impossible_arguments(overrides, message):
    arguments = {"batch_size": 2, "seed": 3, **overrides}
    with pytest.raises(ValueError, match=message):
        ResumableBatches(_dicts(), _mapper, **arguments)


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = str(tmp_path / "f.bin")
    atomic_write(path, lambda f: f.write(b"old"))

    def failing(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_removes_the_temporaries_of_dead_writers_only(tmp_path):
    """Left by this host's killed writers: of this target and of another (a checkpoint name that
    is never saved again). A live writer's temporary file stays; so do another host's (its
    process ids mean nothing here: on a shared folder it may be writing now) and a user's file
    that merely ends in ``.tmp.<digits>``."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ours = lambda target, pid: f"{target}.tmp.dk_detectron2.{socket.gethostname()}.{pid}"  # noqa
    try:
        dead_ones = [ours("f.bin", dead.pid), ours("model_0000003.pth", dead.pid)]
        kept = [ours("g.bin", live.pid), f"f.bin.tmp.dk_detectron2.other-host.{dead.pid}",
                f"notes.txt.tmp.{dead.pid}", f"f.bin.tmp.{dead.pid}"]
        for name in dead_ones + kept:
            (tmp_path / name).write_bytes(b"partial")
        atomic_write(str(tmp_path / "f.bin"), lambda f: f.write(b"new"))
        assert (tmp_path / "f.bin").read_bytes() == b"new"
        assert sorted(os.listdir(tmp_path)) == sorted(["f.bin"] + kept)
    finally:
        live.kill()
        live.wait()


def test_temporary_names_carry_the_package_the_host_and_the_process():
    name = temporary_path("/out/model_final.pth")
    assert name == (f"/out/model_final.pth.tmp.dk_detectron2.{socket.gethostname()}."
                    f"{os.getpid()}")


_STALLED_SAVE = textwrap.dedent("""
    import os, sys, time, torch
    from dk_detectron2.checkpoint import DKCheckpointer
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    checkpointer = DKCheckpointer(model, sys.argv[1])
    checkpointer.save("first")
    fsync = os.fsync
    def stalling_fsync(fd):  # the second save stalls after writing sys.argv[2], before its rename
        if sys.argv[2] + ".tmp." in os.readlink(f"/proc/self/fd/{fd}"):
            print("stalled", flush=True)
            time.sleep(600)
        return fsync(fd)
    os.fsync = stalling_fsync
    with torch.no_grad():
        model.weight.fill_(7)
    checkpointer.save("second")
""")


def _kill_when_stalled(args):
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stalled"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("stalled_file", ["second.pth", "last_checkpoint"])
def test_a_process_killed_inside_a_save_leaves_the_previous_checkpoint(tmp_path, stalled_file):
    """Killed while writing the checkpoint, or after it while tagging it in last_checkpoint: the
    tag still names the first checkpoint, which loads with the first save's weights."""
    _kill_when_stalled(["-c", _STALLED_SAVE, str(tmp_path), stalled_file])
    assert (tmp_path / "last_checkpoint").read_text() == "first.pth"
    assert any(name.startswith(f"{stalled_file}.tmp.") for name in os.listdir(tmp_path))
    if stalled_file == "second.pth":
        assert not (tmp_path / "second.pth").exists()
    else:  # the checkpoint itself is whole, only not tagged
        second = torch.load(tmp_path / "second.pth", weights_only=False)["model"]["weight"]
        assert torch.equal(second, torch.full_like(second, 7))
    torch.manual_seed(0)
    first = torch.nn.Linear(3, 2).state_dict()
    model = torch.nn.Linear(3, 2)
    checkpointer = DKCheckpointer(model, str(tmp_path))
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "first.pth")
    checkpointer.resume_or_load("", resume=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, first[name]), name


_STALLED_METRICS = textwrap.dedent("""
    import sys
    from detectron2.utils.events import EventStorage, JSONWriter
    writer = JSONWriter(sys.argv[1])
    with EventStorage() as storage:
        for iteration in range(2):
            storage.iter = iteration
            storage.put_scalar("loss", iteration + 0.5, smoothing_hint=False)
            writer.write()
        writer._file_handle.write('{"iteration": 2, "lo')  # as a kill inside a write leaves it
        writer._file_handle.flush()
        print("stalled", flush=True)
        import time; time.sleep(600)
""")


def test_a_process_killed_while_appending_to_metrics_json_leaves_its_records(tmp_path):
    """Detectron2's JSONWriter appends a line per record; a process killed inside a write can
    leave half a line. DKTrainer removes it before appending (remove_torn_last_line), so the next
    records are not glued to it and every earlier record still reads."""
    from detectron2.utils.events import EventStorage, JSONWriter

    from dk_detectron2.engine.exact_resume import remove_torn_last_line

    path = tmp_path / "metrics.json"
    _kill_when_stalled(["-c", _STALLED_METRICS, str(path)])
    assert path.read_text().endswith('{"iteration": 2, "lo')
    assert remove_torn_last_line(str(path)) == len('{"iteration": 2, "lo')
    assert remove_torn_last_line(str(path)) == 0  # whole now: unchanged
    writer = JSONWriter(str(path))
    with EventStorage(2) as storage:
        storage.put_scalar("loss", 2.5, smoothing_hint=False)
        writer.write()
    writer.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [{"iteration": i, "loss": i + 0.5} for i in range(3)]


def test_remove_torn_last_line_without_a_whole_record_or_a_file(tmp_path):
    from dk_detectron2.engine.exact_resume import remove_torn_last_line

    path = tmp_path / "metrics.json"
    assert remove_torn_last_line(str(path)) == 0 and not path.exists()
    path.write_text('{"iteration": 0, "loss"' + " " * 100000)  # longer than a read chunk
    assert remove_torn_last_line(str(path)) == 100023 and path.read_text() == ""
