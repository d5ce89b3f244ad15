"""The Jenkins link: node registration, online/offline, agent.jar supervision and the config-folder trigger.

Modules, each importing only modules listed after it:

    integration    wires the parts below into the daemon
    link           the background loop that keeps the node true, and its status
    reconcile      one pass: create or reconfigure the node, post its temporary-offline state
    agent_jar      agent.jar and its secret from the controller, kept running by agent_process
    agent_process  the ``java -jar agent.jar`` supervisor
    watcher        the watchdog config-folder trigger (it calls a build trigger)
    builds         triggering a parameterized build
    session        the authenticated python-jenkins session: credentials, retries, token-free errors
    settings       the ``jenkins:`` section of agentd.yaml and the API token
    node_config, offline, labels, versions, backoff
                   pure parts: a node's config.xml, the offline decision and agentd's mark, labels from
                   GPU facts, the supported controller versions, retry delays
"""
