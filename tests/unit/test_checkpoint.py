import pytest


def test_crash_mid_checkpoint_leaves_previous_intact(tmp_path):
    from rayrl.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    manager.save(10, lambda d: (d / "weights").write_text("step10"), {"total_steps": 30})

    def crash(directory):
        (directory / "weights").write_text("half-written")
        raise OSError("disk full")

    with pytest.raises(OSError):
        manager.save(20, crash, {"total_steps": 30})
    assert manager.latest().name == "step-00000010"
    assert (manager.latest() / "weights").read_text() == "step10"
    assert manager.load_state(manager.latest())["step"] == 10
    manager.save(20, lambda d: (d / "weights").write_text("step20"), {})
    manager.save(30, lambda d: (d / "weights").write_text("step30"), {})
    assert [p.name for p in manager.all()] == ["step-00000020", "step-00000030"]  # keep_last=2
