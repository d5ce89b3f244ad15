"""Config-folder trigger: watchdog -> debounce -> validate -> BuildTrigger.trigger_build (fake controller).

Each test ends with a *barrier*: an invalid config written last. Paths are handled in the order they
settle, so once the barrier has been rejected every earlier event has been handled too, and "no build"
or "exactly one build" can be asserted without sleeping.
"""

import logging
import os
import time
from pathlib import Path

import pytest
import yaml

from agentd.jenkins.builds import BuildTrigger
from agentd.jenkins.session import JenkinsSession
from agentd.jenkins.settings import JenkinsSettings, Secret, WatchSettings
from agentd.jenkins.watcher import ConfigWatcher, WatchError
from fake_jenkins import TOKEN, FakeJenkins
from waiting import wait_for

VALID = "base_model: ./tiny-sd\ntrain_data_dir: ./data\nlora_rank: 4\n"



class Validator:
    """Stands in for the trainer's validator: needs base_model; records what it was shown."""

    def __init__(self):
        self.seen: list[tuple[Path, str]] = []

    def __call__(self, path: Path):
        text = path.read_text()
        self.seen.append((path, text))
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            return f"not YAML: {e}"
        if not isinstance(data, dict) or "base_model" not in data:
            return "missing required key 'base_model'"
        return None


@pytest.fixture
def setup(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "already-there.yaml").write_text(VALID)
    with FakeJenkins() as fake:
        fake.add_job("train-lora")
        settings = JenkinsSettings(url=fake.url, user="agentd", token_env="T", node_name="gpu1",
                                   launcher="none",
                                   watch=WatchSettings(dir=folder, job="train-lora", debounce_s=0.2))
        trigger = BuildTrigger(JenkinsSession(settings, Secret(TOKEN)))
        validator = Validator()
        watcher = ConfigWatcher(settings.watch, validator, trigger.trigger_build)
        watcher.start()
        try:
            yield folder, fake, watcher, validator
        finally:
            watcher.stop()


def barrier(folder: Path, watcher: ConfigWatcher, rejected_before: int = 0) -> None:
    (folder / "zz-barrier.yaml").write_text("not_a_config: true\n")
    wait_for(lambda: watcher.status()["rejected"] > rejected_before, what="barrier handled")


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_valid_config_written_atomically_triggers_exactly_one_build(setup):
    folder, fake, watcher, validator = setup
    target = folder / "sdxl-style.yaml"
    write_atomically(target, VALID)
    wait_for(lambda: fake.builds, what="a build")
    barrier(folder, watcher)
    assert [(b["job"], b["params"]) for b in fake.builds] == [("train-lora", {"CONFIG_FILE": str(target)})]
    assert watcher.status()["triggered"] == 1
    assert all(not p.name.startswith(".") for p, _ in validator.seen)


def test_invalid_config_is_logged_and_not_built(setup, caplog):
    folder, fake, watcher, _ = setup
    caplog.set_level(logging.WARNING, logger="agentd.jenkins.watcher")
    write_atomically(folder / "broken.yml", "lora_rank: 4\n")
    wait_for(lambda: watcher.status()["rejected"] == 1, what="rejection")
    assert fake.builds == []
    assert "broken.yml is invalid, no build triggered: missing required key 'base_model'" in caplog.text
    assert watcher.status()["last"]["outcome"] == "rejected"


def test_editor_swap_and_temp_files_are_ignored(setup):
    folder, fake, watcher, validator = setup
    for name in (".sdxl.yaml.swp", "4913", "sdxl.yaml~", ".#sdxl.yaml", "sdxl.yaml.tmp", "notes.txt"):
        (folder / name).write_text(VALID)
    (folder / ".git").mkdir()
    (folder / ".git" / "x.yaml").write_text(VALID)
    barrier(folder, watcher)
    assert fake.builds == []
    assert [p.name for p, _ in validator.seen] == ["zz-barrier.yaml"]


def test_partial_write_waits_until_the_file_is_complete(setup):
    folder, fake, watcher, validator = setup
    target = folder / "slow-copy.yaml"
    with open(target, "w") as f:
        f.write("base_model: ./tiny-sd\n")
        f.flush()
        for i in range(3):  # keeps changing more often than the debounce window
            time.sleep(0.05)
            f.write(f"# part {i}\n")
            f.flush()
        f.write("lora_rank: 4\n")
    wait_for(lambda: fake.builds, what="a build")
    barrier(folder, watcher)
    texts = [text for path, text in validator.seen if path == target]
    assert texts == [target.read_text()], "validated once, complete"


def test_unchanged_content_and_preexisting_files_do_not_trigger(setup):
    folder, fake, watcher, _ = setup
    target = folder / "a.yaml"
    target.write_text(VALID)
    wait_for(lambda: len(fake.builds) == 1, what="first build")
    os.utime(target)                                          # touch: same content
    os.utime(folder / "already-there.yaml")                   # present before start, unchanged
    barrier(folder, watcher)
    assert len(fake.builds) == 1
    fake.leave_queue()                                        # the first build started
    target.write_text(VALID + "epochs: 2\n")                  # a real change triggers again
    wait_for(lambda: len(fake.builds) == 2, what="second build")


def test_a_change_while_the_same_build_is_still_queued_is_already_queued(setup, caplog):
    folder, fake, watcher, _ = setup
    caplog.set_level(logging.INFO, logger="agentd.jenkins.watcher")
    target = folder / "q.yaml"
    target.write_text(VALID)
    wait_for(lambda: len(fake.builds) == 1, what="first build")
    target.write_text(VALID + "epochs: 3\n")                  # Jenkins answers 303: an identical item waits
    wait_for(lambda: watcher.status()["already_queued"] == 1, what="already queued")
    status = watcher.status()
    assert len(fake.builds) == 1 and status["trigger_failed"] == 0 and status["last"]["outcome"] == "already_queued"
    assert "already has an identical build queued" in caplog.text


def test_a_missing_parameter_is_reported_by_name_and_nothing_is_built(setup, caplog):
    folder, fake, watcher, _ = setup
    fake.add_job("train-lora", parameters=("CONFIG",))       # the job was changed: no CONFIG_FILE
    target = folder / "p.yaml"
    target.write_text(VALID)
    wait_for(lambda: watcher.status()["trigger_failed"] == 1, what="failed trigger")
    error = watcher.status()["last"]["error"]
    assert "'train-lora' does not define the parameter 'CONFIG_FILE'" in error
    assert fake.builds == [] and fake.count("POST", r".*/buildWithParameters") == 0


def test_controller_down_is_logged_and_the_next_change_retries(setup, caplog):
    folder, fake, watcher, _ = setup
    caplog.set_level(logging.ERROR, logger="agentd.jenkins.watcher")
    fake.stop()
    target = folder / "b.yaml"
    target.write_text(VALID)
    wait_for(lambda: watcher.status()["trigger_failed"] == 1, what="failed trigger")
    assert "could not be triggered" in caplog.text and "connection refused" in caplog.text
    fake.start()
    target.write_text(VALID + "# again\n")
    wait_for(lambda: len(fake.builds) == 1, what="build after recovery")


def test_missing_folder_is_a_clear_error(tmp_path):
    watcher = ConfigWatcher(WatchSettings(dir=tmp_path / "nope", job="j"), lambda p: None, lambda j, p: 1)
    with pytest.raises(WatchError, match="does not exist"):
        watcher.start()
