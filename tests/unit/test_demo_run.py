"""The demo keeps copies of its workers' logs, which the kubelet removes with their pods."""

from __future__ import annotations

from joule.demo.run import copy_pod_logs


def test_pod_logs_are_copied_when_they_grow_and_kept_when_the_pod_goes(tmp_path):
    source, target = tmp_path / "pod-logs", tmp_path / "copies"
    log = source / "default_short-worker-0_uid1" / "trainer" / "0.log"
    log.parent.mkdir(parents=True)
    log.write_text("2026-01-01T00:00:00Z stdout F step 1\n")
    (source / "stray.log").write_text("not a container log\n")
    assert copy_pod_logs(source, target) == 1
    copy = target / "default_short-worker-0_uid1" / "trainer" / "0.log"
    assert copy.read_text() == log.read_text()
    assert copy_pod_logs(source, target) == 0  # unchanged: not copied again
    with log.open("a") as f:
        f.write("2026-01-01T00:00:01Z stdout F step 2\n")
    assert copy_pod_logs(source, target) == 1
    assert copy.read_text().count("step") == 2
    log.unlink()
    assert copy_pod_logs(source, target) == 0
    assert copy.read_text().count("step") == 2
    assert not (target / "stray.log").exists()
