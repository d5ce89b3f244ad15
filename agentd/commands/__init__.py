"""One module per `agentd` subcommand group; each exposes main(name, argv) -> exit code."""
