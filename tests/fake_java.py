"""Stand-in for ``java`` in the agent-supervisor tests: ``python fake_java.py -jar agent.jar -url ... ``.

It is launched through the same code path as the real ``java -jar agent.jar`` (settings.java), checks it
got the arguments agent.jar needs, reads the secret from the ``-secret @FILE`` file, and then behaves as
``FAKE_JAVA_MODE`` says: ``sleep`` (run until signalled), ``crash`` (exit 3 at once), ``crash-after``
(exit 3 after ``FAKE_JAVA_RUN_S`` seconds), ``ignore-term`` (ignore SIGTERM, so only SIGKILL stops it).
Each start appends a JSON line to ``FAKE_JAVA_LOG`` (pid, argv, sha256 of the secret it read): never the
secret itself.
"""

import hashlib
import json
import os
import signal
import sys
import time


def main(argv):
    options, flags = {}, set()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-jar", "-url", "-name", "-secret", "-workDir"):
            options[arg] = args.pop(0)
        else:
            flags.add(arg)
    missing = [o for o in ("-jar", "-url", "-name", "-secret", "-workDir") if o not in options]
    if missing or not options["-secret"].startswith("@"):
        print(f"SEVERE: bad arguments, missing {missing}", flush=True)
        return 2
    with open(options["-secret"][1:]) as f:
        secret = f.readline().strip()
    digest = hashlib.sha256(secret.encode()).hexdigest()
    log = os.environ.get("FAKE_JAVA_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "argv": argv, "secret_sha256": digest,
                                "websocket": "-webSocket" in flags}) + "\n")
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
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
