import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from branchnas.errors import RunDirLocked, UserError
from branchnas.rundir import RunDir, atomic_write, atomic_write_json, atomic_write_text, fingerprint


def test_atomic_write_replaces_the_file_in_one_step(tmp_path):
    path = tmp_path / "a" / "out.json"
    atomic_write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_an_exception_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as fh:
            fh.write("half of the new cont")
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_process_killed_mid_write_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    script = textwrap.dedent(
        f"""
        import os, signal
        from branchnas.rundir import atomic_write
        with atomic_write({str(path)!r}, "w") as fh:
            fh.write("partial" * 1000)
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    assert path.read_text() == "old"


def test_a_second_process_cannot_take_the_lock(tmp_path):
    rundir = RunDir(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            f"""
            import sys, time
            from branchnas.rundir import RunDir
            with RunDir({str(rundir.path)!r}).locked():
                print("locked", flush=True)
                sys.stdin.readline()
            """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=rf"in use by pid {holder.pid}"):
            with rundir.locked():
                pass
    finally:
        holder.communicate("\n", timeout=30)
    with rundir.locked():  # free again once the holder has exited: no error
        pass


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    rundir = RunDir(tmp_path)
    with rundir.locked(), rundir.locked():
        pass


def make_body(calls, name="out.txt", fail=False):
    def body(folder):
        calls.append(folder.name)
        (folder / name).write_text(str(len(calls)))
        if fail:
            raise KeyboardInterrupt
        return {"outputs": [f"{folder.name}/{name}"], "note": len(calls)}

    return body


def test_a_stage_with_unchanged_inputs_is_skipped_and_force_redoes_it(tmp_path):
    rundir = RunDir(tmp_path)
    calls = []
    first = rundir.run_stage("a", {"k": 1}, [], make_body(calls))
    assert not first["skipped"] and first["status"] == "done" and first["note"] == 1
    again = rundir.run_stage("a", {"k": 1}, [], make_body(calls))
    assert again["skipped"] and calls == ["a"]
    forced = rundir.run_stage("a", {"k": 1}, [], make_body(calls), force=True)
    assert not forced["skipped"] and calls == ["a", "a"]
    changed = rundir.run_stage("a", {"k": 2}, [], make_body(calls))
    assert not changed["skipped"] and len(calls) == 3
    entry = rundir.stage_entry("a")
    assert entry["config"] == {"k": 2} and entry["seconds"] >= 0


def test_a_changed_upstream_stage_reruns_its_dependants(tmp_path):
    rundir = RunDir(tmp_path)
    calls = []
    rundir.run_stage("a", {"k": 1}, [], make_body(calls))
    rundir.run_stage("b", {}, ["a"], make_body(calls))
    assert rundir.run_stage("b", {}, ["a"], make_body(calls))["skipped"]
    rundir.run_stage("a", {"k": 2}, [], make_body(calls))
    assert rundir.stage_entry("b")["status"] == "stale"
    assert not rundir.run_stage("b", {}, ["a"], make_body(calls))["skipped"]
    assert calls == ["a", "b", "a", "b"]


def test_a_missing_upstream_stage_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="needs stage 'a' to be done first"):
        RunDir(tmp_path).run_stage("b", {}, ["a"], make_body([]))


def test_deleted_outputs_make_the_stage_run_again(tmp_path):
    rundir = RunDir(tmp_path)
    calls = []
    rundir.run_stage("a", {}, [], make_body(calls))
    os.remove(tmp_path / "a" / "out.txt")
    assert not rundir.run_stage("a", {}, [], make_body(calls))["skipped"]


def test_an_interrupted_stage_keeps_its_folder_to_resume_but_a_changed_one_is_cleared(tmp_path):
    rundir = RunDir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        rundir.run_stage("a", {"k": 1}, [], make_body([], name="ckpt", fail=True))
    assert rundir.stage_entry("a")["status"] == "running"
    seen = []

    def resume(folder):
        seen.append((folder / "ckpt").exists())
        return {"outputs": []}

    rundir.run_stage("a", {"k": 1}, [], resume)
    with pytest.raises(KeyboardInterrupt):
        rundir.run_stage("a", {"k": 2}, [], make_body([], name="ckpt", fail=True))
    rundir.run_stage("a", {"k": 3}, [], resume)
    assert seen == [True, False]


def test_fingerprint_ignores_key_order_and_sees_values():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
