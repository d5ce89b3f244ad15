"""Releases without a daemon: the registry's decisions (pure), the settings, and the service against real
targets: folders, a real local S3 (moto over HTTP) and the fake inference servers over HTTP."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from agentd.release import ReleaseError
from agentd.release.artifact import sha256_file
from agentd.release.registry import after_promote, check_name, gate, next_version, rollback_plan, versions
from tests.fake_inference import FakeA1111, FakeComfyUI, FakeVllm
from tests.release_fixtures import LocalS3, decision, make_run


# --- pure decisions ----------------------------------------------------------------------------------

PROD = {"version": 2, "sha256": "ab" * 32}


@pytest.mark.parametrize("dec, production, against_sha, refused_with", [
    (None, None, None, None),  # a first release needs no evaluation
    (decision("worse", None), None, None, "decided worse"),  # ... but one judged worse (vs base) is refused
    (decision("better", "style@v2"), PROD, None, None),
    (decision("no worse", "style@v2"), PROD, None, None),
    (decision("worse", "style@v2", -0.03), PROD, None,
     "clip_t worse (delta -0.03, 95% CI [-0.04, -0.02], margin 0.005)"),
    (decision("unknown", "style@v2"), PROD, None, "decided unknown"),
    (decision("better", "style@v1"), PROD, None, "not with production style@v2"),  # stale comparison
    (decision("better", None), PROD, "ab" * 32, None),  # compared with the production file itself (by hash)
    (None, PROD, None, "no evaluation"),
])
def test_gate(dec, production, against_sha, refused_with):
    refusal = gate("style", dec, production, against_sha)
    if refused_with is None:
        assert refusal is None
    else:
        assert refused_with in refusal


def test_versions_never_reused_and_aliases():
    records = [{"event": "pending", "version": 1}, {"event": "released", "version": 1, "sha256": "a"},
               {"event": "pending", "version": 2}, {"event": "aborted", "version": 2, "error": "x"},
               {"event": "pending", "version": 3}]
    assert next_version(records) == 4  # an aborted and an unfinished version keep their numbers
    assert {v: s["state"] for v, s in versions(records).items()} == {1: "released", 2: "aborted", 3: "pending"}
    a = after_promote({}, 1, "production")
    assert a == {"production": 1, "previous": None, "candidate": None}
    a = after_promote(a, 4, "production")
    assert (a["production"], a["previous"]) == (4, 1)
    assert after_promote(a, 5, "candidate")["production"] == 4
    records += [{"event": "released", "version": 4}, {"event": "released", "version": 5}]
    target, new = rollback_plan({"production": 5, "previous": 4}, records, None)
    assert (target, new["production"], new["previous"]) == (4, 4, 1)  # previous walks further back
    with pytest.raises(ReleaseError, match="v2 is aborted"):
        rollback_plan({"production": 5, "previous": 4}, records, 2)
    with pytest.raises(ReleaseError, match="no previous version"):
        rollback_plan({"production": 1, "previous": None}, records[:2], None)
    for bad in ("My Style", "../x", "", "a" * 65, "-x"):
        with pytest.raises(ReleaseError, match="simple slug"):
            check_name(bad)


def test_settings_errors(tmp_path):
    from agentd.settings import load_settings
    from trainer.errors import ConfigError

    path = tmp_path / "agentd.yaml"
    path.write_text("release:\n  registry: nas\n  default_to: [webui, nope]\n  targets:\n"
                    "    nas: {type: folder, path: loras}\n"
                    "    webui: {type: a1111, url: 'http://127.0.0.1:1', lora_dir: webui}\n")
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert "unknown target 'nope'" in e.value.render()
    path.write_text("release:\n  registry: webui\n  targets:\n    webui: {type: a1111, url: 'http://x', lora_dir: w}\n")
    with pytest.raises(ConfigError, match="it must be a folder or s3 target"):
        load_settings(path)
    path.write_text("release:\n  registry: nas\n  targets:\n    nas: {type: folder, path: loras}\n")
    s = load_settings(path)
    assert s.release.targets["nas"].path == tmp_path / "loras"  # relative to the settings file
    path.write_text("release:\n  registry: b\n  targets:\n    b: {type: s3, bucket: bkt, credential: s3}\n")
    from agentd.release.credentials import CredentialError, read_credential

    with pytest.raises(CredentialError, match="LoadCredential=s3"):
        read_credential("b", load_settings(path).release.targets["b"], environ={})


# --- the service against real targets -----------------------------------------------------------------

def _releases(tmp_path, targets: dict, registry="nas", default_to=None, backup=None, environ=None):
    from agentd.release.service import Releases
    from agentd.release.settings import ReleaseSettings

    settings = ReleaseSettings.model_validate({"registry": registry, "targets": targets, "backup": backup,
                                               "default_to": default_to or [registry]})
    return Releases(settings, tmp_path / "state", tmp_path / "cache", environ=environ or {})


@pytest.fixture(scope="module")
def s3():
    server = LocalS3()
    yield server
    server.stop()


def test_s3_multipart_round_trip_and_corruption(tmp_path, s3):
    cred = tmp_path / "s3.key"
    cred.write_text("testing:testing\n")
    cred.chmod(0o600)
    r = _releases(tmp_path, {"nas": {"type": "folder", "path": str(tmp_path / "nas")},
                             "bucket": {"type": "s3", "bucket": s3.bucket, "prefix": "rel/", "endpoint_url": s3.url,
                                        "region": "us-east-1", "credential_file": str(cred)}},
                  registry="bucket", default_to=["nas", "bucket"])  # the registry in S3 too
    (tmp_path / "nas").mkdir()
    assert r.targets["bucket"].client.meta.config.request_checksum_calculation == "when_required"
    run = make_run(tmp_path / "run", size=(8 << 20) // 32 + 8192)  # just over 8 MiB: a multipart upload
    lora = run / "style.safetensors"
    assert lora.stat().st_size > 8 << 20
    out = r.promote(run, by="alice")
    key = f"rel/style/{out['artifact']}"
    head = s3.client().head_object(Bucket=s3.bucket, Key=key)
    assert "-" in head["ETag"]  # a multipart ETag: not an MD5 of the object, so our sha256 is in the metadata
    assert head["Metadata"]["sha256"] == out["sha256"]
    assert not r.verify("style")["problems"]
    restored = r.targets["bucket"].fetch(versions(r.records("style"))[1], tmp_path / "restored")
    assert restored.read_bytes() == lora.read_bytes()  # downloaded and hashed against the manifest
    # resolve (compare_with: production, for trainer.api.run_job): a local, hash-checked copy of production
    only_s3 = _releases(tmp_path / "b", {"bucket": {"type": "s3", "bucket": s3.bucket, "prefix": "rel/",
                                                    "endpoint_url": s3.url, "region": "us-east-1",
                                                    "credential_file": str(cred)}}, registry="bucket")
    resolved, ref = only_s3.resolve("style")
    assert resolved.parent == tmp_path / "b" / "cache" / "releases" and sha256_file(resolved) == out["sha256"]
    assert ref == "style@v1"  # decision.json's against.release
    assert only_s3.resolve("nothing-here") is None
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=b"corrupted", Metadata={"sha256": out["sha256"]})
    report = r.verify("style")
    assert any("bucket" in p and "does not match its manifest" in p for p in report["problems"])
    bad = _releases(tmp_path, {"b": {"type": "s3", "bucket": "no-such-bucket", "endpoint_url": s3.url,
                                     "region": "us-east-1", "credential_file": str(cred)}}, registry="b")
    with pytest.raises(ReleaseError, match="bucket no-such-bucket does not exist"):
        bad.promote(make_run(tmp_path / "run2", name="other", seed=1))


def test_servers_publish_rollback_and_failure(tmp_path):
    for d in ("nas", "webui", "comfy", "vllm"):
        (tmp_path / d).mkdir()
    a1111 = FakeA1111(tmp_path / "webui").start()
    comfy = FakeComfyUI(tmp_path / "comfy").start()
    vllm = FakeVllm(tmp_path / "vllm", max_lora_rank=8).start()
    try:
        r = _releases(tmp_path, {"nas": {"type": "folder", "path": str(tmp_path / "nas")},
                                 "webui": {"type": "a1111", "url": a1111.url, "lora_dir": str(tmp_path / "webui"),
                                           "families": ["sd"]},
                                 "comfy": {"type": "comfyui", "url": comfy.url, "lora_dir": str(tmp_path / "comfy")},
                                 "chat": {"type": "vllm", "url": vllm.url, "lora_dir": str(tmp_path / "vllm"),
                                          "max_lora_rank": 8, "keep": 1, "canary_prompt": "Hi"}},
                      default_to=["nas", "webui", "comfy"])
        v1 = r.promote(make_run(tmp_path / "r1"))
        v2 = r.promote(make_run(tmp_path / "r2", seed=2, decision=decision("better", "style@v1")))
        stems = [a["artifact"].removesuffix(".safetensors") for a in (v1, v2)]
        assert {x["name"] for x in json.loads(_get(a1111.url + "/sdapi/v1/loras"))} >= set(stems)
        assert a1111.use(stems[1]) != a1111.use(stems[0])  # distinct names: no stale cache under a reused name
        assert v2["artifact"] in json.loads(_get(comfy.url + "/models/loras"))
        # all or nothing: comfy fails after nas and webui got their copies
        comfy.fail_status = 503
        with pytest.raises(ReleaseError, match=r"failed at target comfy: .*503.*production stays v2"):
            r.promote(make_run(tmp_path / "r3", seed=3, decision=decision("better", "style@v2")))
        comfy.fail_status = None
        assert r.aliases("style")["production"] == 2
        assert sorted(p.name for p in (tmp_path / "webui").iterdir()) == sorted(f"{s}.safetensors" for s in stems)
        assert not list((tmp_path / "nas" / "style").glob("style-v3-*"))
        assert [v["state"] for v in r.list("style")["versions"]] == ["released", "released", "aborted"]
        back = r.rollback("style")
        assert (back["to"], r.aliases("style")["production"]) == (1, 1)
        assert not r.verify("style")["problems"]
        with pytest.raises(ReleaseError, match="serves sd LoRAs, and xl is a sdxl LoRA"):
            r.promote(make_run(tmp_path / "x", name="xl", family="sdxl"), to=["webui"])
        # vLLM: a text LoRA by its versioned name, the rank check, the runtime-updating switch, keep
        with pytest.raises(ReleaseError, match="vLLM.*serves PEFT adapters"):
            r.promote(make_run(tmp_path / "img", name="img"), to=["chat"])
        with pytest.raises(ReleaseError, match="rank 16, above the server's --max-lora-rank 8"):
            r.promote(make_run(tmp_path / "t16", name="chat", family="causal_lm", rank=16), to=["nas", "chat"])
        with pytest.raises(ReleaseError, match="lm_head"):
            r.promote(make_run(tmp_path / "lm", name="chat", family="causal_lm", modules_to_save=["lm_head"]),
                      to=["chat"])
        c1 = r.promote(make_run(tmp_path / "t1", name="chat", family="causal_lm", seed=4), to=["nas", "chat"])
        assert vllm.adapters == {c1["artifact"]: str(tmp_path / "vllm" / c1["artifact"])}
        c2 = r.promote(make_run(tmp_path / "t2", name="chat", family="causal_lm", seed=5,
                                decision=decision("no worse", "chat@v1")), to=["nas", "chat"])
        assert list(vllm.adapters) == [c2["artifact"]]  # keep: 1 unloaded v1 (its files stay for a rollback)
        r.rollback("chat")
        assert list(vllm.adapters) == [c1["artifact"]]
        vllm.runtime_updates = False
        with pytest.raises(ReleaseError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
            r.promote(make_run(tmp_path / "t3", name="chat", family="causal_lm", seed=6,
                               decision=decision("better", "chat@v1")), to=["nas", "chat"])
        # refused checks took no version; the failed load took v3, and its copies are gone
        assert not list((tmp_path / "vllm").glob("*chat-v3-*"))
        assert not list((tmp_path / "nas" / "chat").glob("*chat-v3-*"))
        assert r.aliases("chat")["production"] == 1
    finally:
        for f in (a1111, comfy, vllm):
            f.stop()


def test_two_promotes_of_one_name_wait_for_each_other(tmp_path):
    (tmp_path / "nas").mkdir()
    r = _releases(tmp_path, {"nas": {"type": "folder", "path": str(tmp_path / "nas")}})
    runs = [make_run(tmp_path / f"r{i}", seed=i, decision=None) for i in range(2)]
    results, errors = [], []

    def promote(run):
        try:
            results.append(r.promote(run, force=True, reason="parallel test"))
        except ReleaseError as e:
            errors.append(e)

    threads = [threading.Thread(target=promote, args=(run,)) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(x["version"] for x in results) == [1, 2]
    lines = (tmp_path / "nas" / "style" / "registry.jsonl").read_text().splitlines()
    events = [(json.loads(x)["event"], json.loads(x)["version"]) for x in lines]
    # one promote ran after the other: the second's pending comes after the first's released
    assert events[0][0] == "pending" and events[1] == ("released", events[0][1])


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def test_gc_prunes_checkpoints_only_of_runs_with_a_verified_backup(tmp_path):
    import os

    from agentd.gc import released_checkpoints

    for d in ("nas", "offsite"):
        (tmp_path / d).mkdir()
    r = _releases(tmp_path, {"nas": {"type": "folder", "path": str(tmp_path / "nas")},
                             "offsite": {"type": "folder", "path": str(tmp_path / "offsite")}}, backup="offsite")
    released = make_run(tmp_path / "out")
    kept = make_run(tmp_path / "out" / "runs" / "20261201-000000-aaaaaa", seed=9)  # in the history, not released
    for run in (released, kept):
        (run / "checkpoints" / "step-000004").mkdir(parents=True)
        os.utime(run / "checkpoints" / "step-000004", (1, 1))
    r.promote(released)
    assert released_checkpoints([str(tmp_path / "out")], r, cutoff=100) == []  # released, but not backed up yet
    assert r.backup()["copied"] == ["style v1"]
    assert released_checkpoints([str(tmp_path / "out")], r, cutoff=100) == [
        ("released-checkpoint", str(released / "checkpoints" / "step-000004"))]
    assert r.keep(kept) == {"artifact": f"20261205-000009-abcdef-{sha256_file(kept / 'style.safetensors')[:12]}"
                                        ".safetensors", "target": "offsite"}  # backed up, not released
    assert len(released_checkpoints([str(tmp_path / "out")], r, cutoff=100)) == 2
    (tmp_path / "offsite" / "style" / r.list("style")["versions"][0]["artifact"]).write_bytes(b"rot")
    assert released_checkpoints([str(tmp_path / "out")], r, cutoff=100) == [  # v1's copy no longer verifies
        ("released-checkpoint", str(kept / "checkpoints" / "step-000004"))]
    with pytest.raises(ReleaseError, match=r"offsite: style/style-v1-\w+\.safetensors downloaded with sha256 "
                                           r"\w+, but its manifest says \w+"):
        r.restore("style", 1, tmp_path / "restored")


def test_bad_input_is_named_with_its_fix_and_nothing_is_released(tmp_path):
    (tmp_path / "nas").mkdir()
    (tmp_path / "webui").mkdir()
    key = tmp_path / "webui.key"
    key.write_text("admin:wrong-password\n")
    webui = FakeA1111(tmp_path / "webui", api_auth="admin:right-password").start()
    try:
        r = _releases(tmp_path, {"nas": {"type": "folder", "path": str(tmp_path / "nas")},
                                 "webui": {"type": "a1111", "url": webui.url, "lora_dir": str(tmp_path / "webui"),
                                           "credential_file": str(key)},
                                 "down": {"type": "comfyui", "url": "http://127.0.0.1:9", "lora_dir": str(tmp_path),
                                          "timeout_s": 2}},
                      default_to=["nas", "webui"])
        cases = [
            (make_run(tmp_path / "failed", status="failed"), {}, "is failed, not succeeded"),
            (tmp_path / "nas", {}, r"is not a run folder \(no run.json\)"),
            (make_run(tmp_path / "r1"), {"name": "My Style"}, "not a simple slug"),
            (make_run(tmp_path / "r2"), {}, "failed at target webui: .*answered 401.*release.targets.webui.credential"),
            (make_run(tmp_path / "r3"), {"to": ["nas", "down"]}, "failed at target down: .*unreachable"),
        ]
        (tmp_path / "r4").mkdir()
        (tmp_path / "r4" / "run.json").write_text(json.dumps({"name": "style", "status": "succeeded"}))
        cases.append((tmp_path / "r4", {}, "has no LoRA"))
        for run, kw, message in cases:
            with pytest.raises(ReleaseError, match=message) as e:
                r.promote(run, **kw)
            assert "wrong-password" not in str(e.value)
        assert r.aliases("style")["production"] is None and not list((tmp_path / "webui").iterdir())
        assert not list((tmp_path / "nas" / "style").glob("*.safetensors*"))
    finally:
        webui.stop()


def test_only_a_submitter_who_can_read_the_run_may_promote_it():
    import os
    import shutil
    import tempfile

    from agentd.release.service import check_permission

    tmp_path = Path(tempfile.mkdtemp(prefix="agentd-release-"))  # pytest's base folder is 0700: use /tmp itself
    os.chmod(tmp_path, 0o755)
    try:
        _check_permissions(tmp_path, check_permission)
    finally:
        shutil.rmtree(tmp_path)


def _check_permissions(tmp_path, check_permission):
    import os

    run = make_run(tmp_path / "private")
    os.chmod(run, 0o700)
    stranger = {"uid": 54321, "gid": 54321, "groups": [54321], "user": None}
    with pytest.raises(ReleaseError, match=r"uid 54321 may not promote .*private: uid 54321 may not read\+search") as e:
        check_permission("promote", run, stranger)
    assert e.value.code == "not_permitted"
    os.chmod(run, 0o755)
    os.chmod(run / "style.safetensors", 0o600)
    with pytest.raises(ReleaseError, match="style.safetensors"):
        check_permission("promote", run, stranger)
    os.chmod(run / "style.safetensors", 0o644)
    check_permission("promote", run, stranger)
    with pytest.raises(ReleaseError, match="may not restore"):
        check_permission("restore", run, stranger)  # 0755 root's: a stranger may not write into it
    check_permission("list", None, stranger)
