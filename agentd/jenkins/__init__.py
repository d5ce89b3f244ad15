"""The Jenkins link: node registration, online/offline, agent.jar supervision and the config-folder trigger.

Modules: ``settings`` (the ``jenkins:`` section of agentd.yaml and the API token), ``labels`` (pure label
derivation from GPU facts), ``link`` (python-jenkins client and its reconcile loop), ``agent_process``
(the ``java -jar agent.jar`` supervisor) and ``watcher`` (the watchdog config-folder trigger).
"""
