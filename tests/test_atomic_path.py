"""`storage.atomic_path` on local folders: an existing folder is replaced in place (its mode,
the links to it), "." is the working directory, and staging folders that a killed process left
are removed by the next write; `storage.overlap`."""

import os
import socket
import stat
import subprocess

import pytest

from ella_jax import storage


def write_folder(destination, names: list[str]) -> None:
    with storage.atomic_path(destination, overwrite=True) as staged:
        staged.mkdir()
        for name in names:
            (staged / name).write_text(name)


def test_an_existing_folder_keeps_its_mode_and_holds_only_the_new_entries(tmp_path):
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    os.chmod(out, 0o700)  # whatever the umask
    (out / "old.png").write_text("old")
    (out / "same.png").write_text("old")
    write_folder(out, ["same.png", "new.png"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert sorted(p.name for p in out.iterdir()) == ["new.png", "same.png"]
    assert (out / "same.png").read_text() == "same.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left


def test_a_symbolic_link_stays_a_link_to_the_new_entries(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "old.png").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(target)
    write_folder(link, ["new.png"])
    assert link.is_symlink() and link.resolve() == target
    assert [p.name for p in target.iterdir()] == ["new.png"]


def test_the_working_directory_as_the_destination(tmp_path, monkeypatch):
    cwd = tmp_path / "here"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    write_folder(".", ["a.png"])
    assert os.getcwd() == str(cwd) and [p.name for p in cwd.iterdir()] == ["a.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_a_failed_write_leaves_the_old_folder_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.png").write_text("old")
    with pytest.raises(RuntimeError), storage.atomic_path(out, overwrite=True) as staged:
        staged.mkdir()
        (staged / "new.png").write_text("new")
        raise RuntimeError("the sampler failed")
    assert [p.name for p in out.iterdir()] == ["old.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staging_left_by_a_killed_process_is_removed_by_the_next_write(tmp_path):
    """A SIGKILL skips every cleanup: the next write of the same destination removes what a
    process of this host that is gone left, and keeps a live process's."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    abandoned = tmp_path / f".out.staging-{host}-{gone.pid}-x1y2"
    live = tmp_path / f".out.staging-{host}-{os.getppid()}-z3w4"
    other_host = tmp_path / f".out.staging-elsewhere-{gone.pid}-q5r6"
    for folder in (abandoned, live, other_host):
        (folder / "out").mkdir(parents=True)
        assert storage.is_staging(folder.name)
    write_folder(tmp_path / "out", ["a.png"])
    assert not abandoned.exists()
    assert live.exists() and other_host.exists()


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("runs/a", "runs/a", True),
        ("runs/a", "runs/a/ella.safetensors", True),
        ("runs/a/samples", "runs", True),
        ("runs/a", "runs/ab", False),
        (".", "runs", True),
        ("gs://bucket/out", "gs://bucket/out/", True),
        ("gs://bucket/out", "gs://bucket/outside", False),
        ("gs://bucket/out", "s3://bucket/out", False),
    ],
)
def test_overlap(first, second, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.overlap(first, second) is expected
    assert storage.overlap(second, first) is expected


def test_overlap_sees_through_links(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "run")
    assert storage.overlap(tmp_path / "alias", tmp_path / "run" / "ella.safetensors")
