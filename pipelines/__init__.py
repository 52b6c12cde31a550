"""AgentTuning on Ray: Ray jobs (data, train, collect, eval, run)."""
