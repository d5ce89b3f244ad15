"""The Jenkins link: node registration, online/offline, agent.jar supervision and the config-folder trigger.

Modules, from the daemon down: ``integration`` (wires them into the daemon), ``link`` (the background loop
that keeps the node true, and its status), ``reconcile`` (one pass: create or reconfigure the node, post its
offline state), ``agent_jar`` (agent.jar and its secret from the controller, kept running),
``agent_process`` (the ``java -jar agent.jar`` supervisor), ``builds`` (triggering a parameterized build)
and ``watcher`` (the watchdog config-folder trigger that calls it), ``session`` (the authenticated
python-jenkins session: retries, token-free errors); and pure parts: ``node_config`` (a node's config.xml),
``offline`` (the temporary-offline decision and agentd's mark), ``labels`` (labels from GPU facts),
``versions`` (the supported controller versions), ``backoff`` (retry delays), ``settings`` (the
``jenkins:`` section of agentd.yaml and the API token).
"""
