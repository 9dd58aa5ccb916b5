"""Embedded broker housekeeping."""

from __future__ import annotations

import os
import time
from pathlib import Path

from service.config import Settings
from service.queue import broker_transport_options, prune_processed_messages


def test_embedded_broker_uses_absolute_folders_and_prunes_old_messages(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=None, broker_url=None)
    options = broker_transport_options(settings)
    assert all(Path(str(options[key])).is_absolute() for key in ("data_folder_in", "control_folder", "processed_folder"))
    assert options["data_folder_in"] == options["data_folder_out"]
    processed = settings.broker_folder / "processed"
    old, new = processed / "1_a.cpu.msg", processed / "2_b.cpu.msg"
    old.write_text("{}")
    new.write_text("{}")
    past = time.time() - 7200
    os.utime(old, (past, past))
    assert prune_processed_messages(settings, older_than_s=3600) == 1
    assert not old.exists() and new.exists()


def test_redis_broker_has_no_folders(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0")
    assert "data_folder_in" not in broker_transport_options(settings)
    assert prune_processed_messages(settings) == 0
    assert not (tmp_path / "broker").exists()
