"""Releases through one real daemon: promote -> verify -> a worse run refused -> forced with a reason ->
rollback -> verify -> backup and restore, the CLI over the socket; then a SIGKILL during a promote and a
restarted daemon that reports and repairs it; and a sentinel secret in every credential that must appear in
no output. The targets are a folder, a real local S3 (moto) and a fake AUTOMATIC1111 over HTTP."""
from __future__ import annotations

import json
import os
import subprocess

from agentd.release.artifact import sha256_file
from tests.conftest import BIN
from tests.daemon_harness import DaemonProc
from tests.fake_inference import FakeA1111
from tests.release_fixtures import LocalS3, decision, make_run

SENTINEL = "SENTINEL-7f3a9c"


def test_release_lifecycle_through_the_daemon(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    for d in ("nas", "webui", "offsite"):
        (tmp_path / d).mkdir()
    creds = tmp_path / "creds"  # what systemd's LoadCredential= gives the daemon
    creds.mkdir()
    (creds / "s3-loras").write_text(f"testing:{SENTINEL}-s3\n")
    webui_key = tmp_path / "webui.key"
    webui_key.write_text(f"admin:{SENTINEL}-webui\n")
    webui_key.chmod(0o600)
    s3 = LocalS3()
    webui = FakeA1111(tmp_path / "webui", api_auth=f"admin:{SENTINEL}-webui").start()
    settings = f"""release:
  registry: nas
  default_to: [nas, bucket, webui]
  backup: offsite
  targets:
    nas: {{type: folder, path: {tmp_path / 'nas'}}}
    offsite: {{type: folder, path: {tmp_path / 'offsite'}}}
    bucket: {{type: s3, bucket: {s3.bucket}, endpoint_url: "{s3.url}", region: us-east-1, credential: s3-loras}}
    webui: {{type: a1111, url: "{webui.url}", lora_dir: {tmp_path / 'webui'}, credential_file: {webui_key},
             families: [sd]}}
"""
    # A credential the daemon cannot read stops it at start with exit 78, naming the field.
    bad = subprocess.run([str(BIN / "agentd"), "serve", "--config", str(_settings_file(tmp_path, settings))],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "CREDENTIALS_DIRECTORY": ""})
    assert bad.returncode == 78 and "release.targets.bucket.credential s3-loras" in bad.stderr
    outputs = [bad.stdout + bad.stderr]
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    d = DaemonProc(root, settings, env=env).start()
    try:
        def agentd(*args, code=0):
            r = d.run(*args)
            outputs.append(r.stdout + r.stderr)
            assert r.returncode == code, r.stdout + r.stderr
            return r.stdout + r.stderr

        def ask(op="release", **msg):  # the socket directly, where the CLI's own output is not the point
            reply = d.request({"op": op, **msg}, timeout=60)
            outputs.append(json.dumps(reply))
            return reply

        r1 = make_run(tmp_path / "r1", seed=1)  # a first release: nothing to compare with yet
        assert "released style v1 as style-v1-" in agentd("release", "promote", str(r1))
        assert "style: OK (3 copies checked)" in agentd("release", "verify", "style")
        r2 = make_run(tmp_path / "r2", seed=2, decision=decision("worse", "style@v1", -0.03))
        out = agentd("release", "promote", str(r2), code=1)
        assert "refused" in out and "clip_t worse (delta -0.03, 95% CI [-0.04, -0.02], margin 0.005)" in out
        assert "--force --reason" in out
        assert "needs --reason" in ask(action="promote", run=str(r2), force=True)["error"]["message"]
        assert "released style v2" in agentd("release", "promote", str(r2), "--force", "--reason", "hotfix for demo")
        listing = agentd("release", "list", "style")
        assert "production v2, previous v1" in listing and "forced: hotfix for demo" in listing
        assert "rolled style back from v2 to v1" in agentd("release", "rollback", "style")
        assert ask(action="verify", name="style")["problems"] == []
        assert "no previous version" in ask(action="rollback", name="style")["error"]["message"]  # v1 was first
        backup = ask("backup")  # (the daemon's daily pass, at its start, may have copied v1 already)
        assert sorted(backup["copied"] + backup["verified"]) == ["style v1", "style v2"] and not backup["problems"]
        restore = tmp_path / "restored"
        assert "sha256 checked" in agentd("backup", "--restore", "style", "v2", str(restore))
        assert sha256_file(next(restore.glob("style-v2-*.safetensors"))) == sha256_file(r2 / "style.safetensors")
        out = ask(action="promote", run=str(r1), to=["nas", "nowhere"])["error"]["message"]
        assert "unknown target nowhere" in out

        # SIGKILL during a promote: the webui hangs in its refresh while nas and the bucket have their copies
        r3 = make_run(tmp_path / "r3", seed=3, decision=decision("better", "style@v1"))
        webui.delay_s = 30
        promote = d.agentd("release", "promote", str(r3))
        registry = tmp_path / "nas" / "style" / "registry.jsonl"
        d.wait_for(lambda: list((tmp_path / "webui").glob("style-v3-*")), 30, "the copy into the webui folder")
        d.kill()
        promote.communicate(timeout=30)
        webui.delay_s = 0
        assert json.loads(registry.read_text().splitlines()[-1])["event"] == "pending"
        assert list((tmp_path / "nas" / "style").glob("style-v3-*"))  # the copy a repair must remove
        d = DaemonProc(root, settings, env=env).start()
        assert "v3: a promote was interrupted" in ask(action="verify", name="style")["problems"][0]
        out = agentd("release", "promote", str(r3))
        assert "released style v4" in out and "repaired: v3: interrupted" in out
        for folder in ("nas/style", "webui"):
            assert not list((tmp_path / folder).glob("*style-v3-*")), folder  # temporary copies too
        assert not [o for o in s3.client().list_objects_v2(Bucket=s3.bucket).get("Contents", [])
                    if "style-v3-" in o["Key"]]
        assert ask(action="verify", name="style")["problems"] == []
        status = json.dumps(d.status())
    finally:
        d.stop()
        webui.stop()
        s3.stop()
    assert any(h.startswith("Basic ") for h in webui.auth_headers)  # the credential was used ...
    # ... and appears nowhere else: logs, status, journal, registry, errors, CLI output
    places = {"daemon log": d.log.read_text(), "status": status, "cli": "\n".join(outputs),
              "journal": (root / "state" / "journal.sqlite3").read_bytes().decode("latin-1")}
    for p in list((tmp_path / "nas").rglob("*.json*")) + list((tmp_path / "offsite").rglob("*.json*")):
        places[str(p)] = p.read_text()
    for where, text in places.items():
        assert SENTINEL not in text, where


def _settings_file(tmp_path, release: str):
    path = tmp_path / "bad.yaml"
    path.write_text(f"socket: {tmp_path}/bad.sock\nstate_dir: {tmp_path}/bad-state\ncache_dir: {tmp_path}/bad-cache\n"
                    + release)
    return path


