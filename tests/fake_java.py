"""Stand-in for ``java`` in the agent tests: ``python fake_java.py -jar agent.jar -url ... ``.

It is launched through the same code path as the real ``java -jar agent.jar`` (settings.java) and parses
the arguments the way the agent.jar it is given would: it reads the remoting version from the jar's
manifest (``Version:``, as tests/fake_jenkins.py serves it per controller version; a missing or foreign
jar counts as the newest remoting) and accepts exactly that remoting's ``hudson.remoting.Launcher``
options (jenkinsci/remoting ``src/main/java/hudson/remoting/Launcher.java``; ``-url``, ``-name``,
``-webSocket`` and friends exist from remoting 3176, bundled from Jenkins 2.437 / LTS 2.440.1). On an
unknown option it does what ``Launcher.main`` does with args4j's ``CmdLineException``: prints
``"-url" is not a valid option``, ``java -jar agent.jar [options...]`` and the usage to stderr, and exits 0.

Then it reads the secret from the ``-secret @FILE`` file and behaves as ``FAKE_JAVA_MODE`` says: ``sleep``
(run until signalled), ``crash`` (exit 3 at once), ``crash-after`` (exit 3 after ``FAKE_JAVA_RUN_S``
seconds), ``ignore-term`` (ignore SIGTERM, so only SIGKILL stops it). Once connected it runs
``FAKE_JAVA_BUILD_STEP`` (if set) through the shell in its work folder, as a Jenkins ``sh`` step would,
and logs its exit code and output. Each start appends a JSON line to
``FAKE_JAVA_LOG`` (pid, argv, remoting version, sha256 of the secret it read, or ``usage_exit``): never the
secret itself.
"""

import hashlib
import json
import os
import re
import signal
import sys
import time
import zipfile

# settings.java for the tests: this file, run by the Python that runs the tests.
FAKE_JAVA = f"{sys.executable} {os.path.abspath(__file__)}"

NEWEST_REMOTING = 3309
# Launcher options (value-taking / boolean) of remoting before 3176 ...
OLD_VALUE_OPTIONS = {"-jnlpUrl", "-jnlpCredentials", "-secret", "-proxyCredentials", "-cp", "-classpath", "-tcp",
                     "-auth", "-jar-cache", "-connectTo", "-agentLog", "-loggingConfig", "-workDir", "-internalDir",
                     "-cert", "-protocols"}
OLD_FLAGS = {"-noCertificateCheck", "-noReconnect", "-noKeepAlive", "-text", "-failIfWorkDirIsMissing", "-headless",
             "-help", "-version", "-disableHttpsCertValidation"}
# ... and what 3176 added: agentd's -url/-name/-webSocket among them.
NEW_VALUE_OPTIONS = {"-url", "-name", "-webSocketHeader", "-tunnel", "-direct", "-instanceIdentity",
                     "-noReconnectAfter"}
NEW_FLAGS = {"-webSocket"}


def remoting_build(jar_path):
    """The remoting build number from the jar's manifest ``Version: 3206.vb_...``."""
    try:
        with zipfile.ZipFile(jar_path) as jar:
            manifest = jar.read("META-INF/MANIFEST.MF").decode("utf-8", "replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return NEWEST_REMOTING
    match = re.search(r"^Version:\s*(\d+)", manifest, re.MULTILINE)
    return int(match.group(1)) if match else NEWEST_REMOTING


def usage_exit(bad):
    """``Launcher.main``: the args4j error, the usage line and the options, then return (exit 0)."""
    print(f'"{bad}" is not a valid option', file=sys.stderr, flush=True)
    print("java -jar agent.jar [options...]", file=sys.stderr, flush=True)
    for option in sorted(OLD_VALUE_OPTIONS | OLD_FLAGS):
        print(f" {option:<40} : ...", file=sys.stderr, flush=True)
    return 0


def log_start(entry):
    log = os.environ.get("FAKE_JAVA_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")


def main(argv):
    if len(argv) < 2 or argv[0] != "-jar":
        print("Usage: java [options] -jar jarfile [args...]", file=sys.stderr, flush=True)
        return 1
    jar, args = argv[1], list(argv[2:])
    build = remoting_build(jar)
    values, flags = set(OLD_VALUE_OPTIONS), set(OLD_FLAGS)
    if build >= 3176:
        values |= NEW_VALUE_OPTIONS
        flags |= NEW_FLAGS
    options, given_flags = {}, set()
    while args:
        arg = args.pop(0)
        if arg in values and args:
            options[arg] = args.pop(0)
        elif arg in flags:
            given_flags.add(arg)
        else:
            log_start({"pid": os.getpid(), "argv": argv, "remoting": build, "usage_exit": True})
            return usage_exit(arg)
    missing = [o for o in ("-url", "-name", "-secret", "-workDir") if o not in options]
    if missing or not options["-secret"].startswith("@"):
        print(f"SEVERE: bad arguments, missing {missing}", flush=True)
        return 2
    with open(options["-secret"][1:]) as f:
        secret = f.readline().strip()
    digest = hashlib.sha256(secret.encode()).hexdigest()
    log_start({"pid": os.getpid(), "argv": argv, "secret_sha256": digest, "remoting": build,
               "websocket": "-webSocket" in given_flags})
    mode = os.environ.get("FAKE_JAVA_MODE", "sleep")
    print(f"INFO: fake agent {options['-name']} connecting to {options['-url']} (mode {mode})", flush=True)
    if mode == "crash":
        print("SEVERE: cannot connect, giving up", flush=True)
        return 3
    if mode == "crash-after":
        time.sleep(float(os.environ.get("FAKE_JAVA_RUN_S", "0.1")))
        return 3
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("INFO: ignoring SIGTERM", flush=True)
    print("INFO: Connected", flush=True)
    step = os.environ.get("FAKE_JAVA_BUILD_STEP")
    if step:  # a Jenkins `sh` step: a child of the agent, with its user, environment and work folder
        import subprocess

        done = subprocess.run(step, shell=True, capture_output=True, text=True, cwd=options["-workDir"])
        log_start({"pid": os.getpid(), "build_step": step, "rc": done.returncode, "output": done.stdout,
                   "errors": done.stderr})
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
