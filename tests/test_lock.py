"""One writer per ``train.out_dir`` (issue 21 item 3): a second run, in another process or
another thread, is refused in one line naming the holder; a killed holder's lock is taken
over at once; the lock is re-entrant in its own thread and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from qimera import cli
from qimera._lock import OutDirBusy, hold_out_dir, lock_path, read_holder
from qimera.runtime import stop_group

HOLD = ("import sys, time\nfrom qimera._lock import hold_out_dir\nwith hold_out_dir(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n")


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tiny_config, tmp_path,
                                                                                           capsys):
    out = Path(tiny_config["train"]["out_dir"])
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert read_holder(out)["pid"] == holder.pid
        with pytest.raises(OutDirBusy) as busy:
            with hold_out_dir(out):
                pass
        message = str(busy.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in message, message
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(tiny_config))
        assert cli.main(["run", str(config)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "in use by another run" in lines[0], lines
        assert sorted(p.name for p in out.iterdir()) == [lock_path(out).name]  # the refused run wrote nothing
    finally:
        stop_group(holder, ((signal.SIGKILL, 5.0),))
    # the kernel dropped the dead holder's flock: the next run takes the lock over at once
    with hold_out_dir(out):
        assert read_holder(out)["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_the_lock_is_reentrant_in_its_thread_refuses_other_threads_and_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b"
    refused: list[str] = []

    def other() -> None:
        try:
            with hold_out_dir(out):
                pass
        except OutDirBusy as exc:
            refused.append(str(exc))

    with hold_out_dir(out):
        with hold_out_dir(out):  # qimera.run holds it and its Trainer takes it again
            assert lock_path(out).is_file()
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert lock_path(out).is_file()
    assert len(refused) == 1 and "another thread" in refused[0]
    assert not (tmp_path / "a").exists()  # the directories made for the hold, empty again, are gone
