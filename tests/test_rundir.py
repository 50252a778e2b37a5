"""A run directory belongs to one run; resource and output checks before work starts; Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, smoke_config

from bertray import rundir, tracking
from bertray.cli import main
from bertray.cluster import MIN_CPU_SHARE, _shortfall, cpu_share_per_worker, train_request
from bertray.config import RunConfig

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _cli(capsys, *args, runner="bertray.train:run"):
    status = main("", RunConfig, runner, ["--config", SMOKE, *args])
    return status, capsys.readouterr().err


# ----------------------------------------------------------------------------- fingerprints (pure)


def test_fingerprint_ignores_what_a_resume_may_change(tmp_path):
    a = smoke_config(tmp_path / "a")
    b = smoke_config(tmp_path / "b", "scaling.num_workers=2", "train.log_every_n_steps=1", "checkpoint.num_to_keep=5")
    assert rundir.fingerprint(a) == rundir.fingerprint(b)


def test_differences_name_each_key_old_to_new(tmp_path):
    a = rundir.fingerprint(smoke_config(tmp_path))
    b = rundir.fingerprint(smoke_config(tmp_path, "data.label_column=fine", "train.lr=1e-5"))
    assert rundir.differences(a, b) == ['data.label_column: "label" → "fine"', "train.lr: 0.0003 → 1e-05"]
    assert rundir.differences(a, a) == []


def test_claim_resumes_same_refuses_other_and_fresh_start_deletes(tmp_path):
    run_dir = str(tmp_path / "ray" / "run")
    fp = rundir.fingerprint(smoke_config(tmp_path))
    assert rundir.claim(run_dir, fp, fresh_start=False) == "new"
    (tmp_path / "ray" / "run" / "checkpoint_000000").mkdir()
    assert rundir.claim(run_dir, fp, fresh_start=False) == "running"
    rundir.mark(run_dir, "finished")
    assert rundir.claim(run_dir, fp, fresh_start=False) == "finished"
    other = {**fp, "data.train": "/elsewhere.parquet"}
    with pytest.raises(rundir.RunDirError, match=r"data.train: .*→ \"/elsewhere.parquet\"[\s\S]*fresh_start=true"):
        rundir.claim(run_dir, other, fresh_start=False)
    assert rundir.claim(run_dir, other, fresh_start=True) == "new"
    assert not (tmp_path / "ray" / "run" / "checkpoint_000000").exists()
    assert json.loads((tmp_path / "ray" / "run" / rundir.RUN_FILE).read_text())["fingerprint"] == other


def test_checkpoints_without_record_are_refused(tmp_path):
    (tmp_path / "run" / "checkpoint_000001").mkdir(parents=True)
    with pytest.raises(rundir.RunDirError, match=r"no bertray_run.json .*new name or output_dir.*fresh_start=true"):
        rundir.claim(str(tmp_path / "run"), {}, fresh_start=False)


def test_other_labels_are_another_run(tmp_path):
    run_dir = str(tmp_path / "run")
    rundir.claim(run_dir, {}, fresh_start=False)
    rundir.check_labels(run_dir, ["a", "b"])
    rundir.check_labels(run_dir, ["a", "b"])
    with pytest.raises(rundir.RunDirError, match=r"\['a', 'b'\] → \['a', 'c'\]"):
        rundir.check_labels(run_dir, ["a", "c"])


# ----------------------------------------------------------------------------- output_dir and resources (pure)


def test_output_dir_that_is_a_file_or_read_only_is_refused_before_ray(tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("x")
    status, err = _cli(capsys, f"output_dir={file}")
    assert status == 1 and f"output_dir={file} is a file" in err
    status, err = _cli(capsys, f"output_dir={file}/below")
    assert status == 1 and "is a file, so the directory cannot be created" in err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root writes anywhere
        status, err = _cli(capsys, f"output_dir={locked}/run")
        assert status == 1 and "is not writable" in err


def test_cpu_share_rule():
    assert cpu_share_per_worker(16, 3, 1) == 5.0
    assert cpu_share_per_worker(2, 3, 1) == 0.33
    assert cpu_share_per_worker(1, 2, 1) == 0.0


@pytest.mark.parametrize("overrides, expected", [
    (["scaling.num_workers=64"], r"scaling.num_workers=64 .*2 CPUs.*0.01 CPU per training worker"),
    (["scaling.cpus_per_worker=4"], r"scaling.cpus_per_worker=4: the largest node has 2 CPUs"),
    (["scaling.num_workers=2", "scaling.cpus_per_worker=1"], r"needs 2.5 CPUs and 0 GPUs; the cluster has 2 CPUs"),
    (["scaling.use_gpu=true"], r"needs 1.5 CPUs and 1 GPUs; the cluster has 2 CPUs and 0 GPUs"),
])
def test_over_asks_name_the_keys_and_the_cluster(tmp_path, overrides, expected):
    import re

    problem = _shortfall(smoke_config(tmp_path, *overrides), {"CPU": 2.0}, 2.0)
    assert problem and re.search(expected, problem), problem


def test_default_requests_fit_two_cpus(tmp_path):
    assert _shortfall(smoke_config(tmp_path), {"CPU": 2.0}, 2.0) is None
    cfg = smoke_config(tmp_path, "scaling.num_workers=2")
    assert _shortfall(cfg, {"CPU": 2.0}, 2.0) is None
    assert train_request(cfg, 2.0)[0] == 0.5 >= MIN_CPU_SHARE


def test_tune_rerun_without_resume_is_refused(tmp_path, capsys):
    (tmp_path / "ray" / "t-tune").mkdir(parents=True)
    (tmp_path / "ray" / "t-tune" / "tuner.pkl").write_bytes(b"untrusted")
    space = 'tune.space={"train.lr": {"choice": [1.0e-4]}}'
    status, err = _cli(capsys, f"output_dir={tmp_path}/t", f"storage_path={tmp_path}/ray", space,
                       runner="bertray.tune:run")
    assert status == 1 and "already holds a search" in err and "tune.resume=true" in err
    assert "trust" in err and "fresh_start=true" in err
    assert (tmp_path / "ray" / "t-tune" / "tuner.pkl").read_bytes() == b"untrusted"


def test_trial_label_names_sampled_values():
    from bertray.tune import trial_label

    assert trial_label({"train.lr": 7.3e-05, "train.epochs": 2}) == "epochs=2 lr=7.3e-05"
    assert trial_label({}, "abc") == "abc"


# ----------------------------------------------------------------------------- through the training job


def test_rerun_rules_through_the_cli(ray_session, data_root, tmp_path, capsys):
    out = tmp_path / "run"
    base = [f"output_dir={out}", "train.epochs=1", "data.max_train_rows=64", "data.max_validation_rows=32"]
    status, err = _cli(capsys, *base)
    assert status == 0, err
    model = out / "model" / "model.safetensors"
    first = model.stat().st_mtime_ns
    record = json.loads((out / "ray" / "run" / rundir.RUN_FILE).read_text())
    assert record["status"] == "finished" and record["labels"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]

    status, err = _cli(capsys, *base, "data.label_column=fine")  # other labels: refused, old model kept
    assert status == 1
    assert 'data.label_column: "label" → "fine"' in err and "fresh_start=true" in err
    config = json.loads((out / "model" / "config.json").read_text())
    assert set(config["id2label"].values()) == {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}

    status, err = _cli(capsys, *base, f"output_dir={tmp_path}/big", "scaling.num_workers=64")
    assert status == 1 and "scaling.num_workers=64" in err and "the cluster has 2 CPUs" in err

    status, err = _cli(capsys, *base, "data.max_train_rows=32", "fresh_start=true")
    assert status == 0, err
    assert model.stat().st_mtime_ns != first
    assert json.loads((out / "ray" / "run" / rundir.RUN_FILE).read_text())["fingerprint"]["data.max_train_rows"] == 32


def test_finished_run_reexports_without_training(ray_session, data_root, tmp_path, capfd):
    out = tmp_path / "done"
    args = ["--config", SMOKE, f"output_dir={out}", "train.epochs=1", "data.max_train_rows=32",
            "data.max_validation_rows=16"]
    assert main("", RunConfig, "bertray.train:run", args) == 0
    (out / "model").rename(out / "model.first")
    capfd.readouterr()
    assert main("", RunConfig, "bertray.train:run", args) == 0
    printed = capfd.readouterr().out
    assert "already finished" in printed and "step=" not in printed
    assert (out / "model" / "model.safetensors").read_bytes() == (out / "model.first" / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_exits_130_with_state_saved(data_root, tmp_path):
    out = tmp_path / "ctrl_c"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # tracked through the standard variable
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1", tracking.ENV_URI: store}
    proc = subprocess.Popen([sys.executable, "jobs/train.py", "--config", SMOKE, f"output_dir={out}",
                             "train.epochs=50", "train.log_every_n_steps=1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait until steps are being trained
        lines.append(line)
        if "step=" in line:
            break
    assert proc.poll() is None, "".join(lines)[-3000:]
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 130, ("".join(lines) + rest)[-3000:]
    assert "interrupted:" in rest and "re-run the same command to resume" in rest and str(out) in rest
    assert took < 30, took
    assert json.loads((out / "ray" / "ctrl_c" / rundir.RUN_FILE).read_text())["status"] == "running"
    # The MLflow run is marked KILLED, and a rerun finds it again by its run directory (no second run).
    tracker = tracking.Tracker.connect(store)
    runs = tracker.client.search_runs([tracker.client.get_experiment_by_name("ctrl_c").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert runs[0].data.tags[tracking.RUN_DIR_TAG] == str(out / "ray" / "ctrl_c")
    again, created = tracker.start("ctrl_c", str(out / "ray" / "ctrl_c"), "ctrl_c", fresh=False)
    assert not created and again.run_id == runs[0].info.run_id


def test_release_removes_only_a_run_that_never_started(tmp_path):
    storage = tmp_path / "ray"
    fresh, started = str(storage / "fresh"), str(storage / "started")
    rundir.claim(fresh, {"a": 1}, fresh_start=False)
    rundir.claim(started, {"a": 1}, fresh_start=False)
    (storage / "started" / "checkpoint_0").mkdir()
    rundir.release(fresh)
    rundir.release(started)
    assert not (storage / "fresh").exists()
    assert (storage / "started" / rundir.RUN_FILE).exists() and (storage / "started" / "checkpoint_0").exists()
    rundir.release(started + "-never-claimed")  # nothing there: nothing to do
    assert storage.exists()
