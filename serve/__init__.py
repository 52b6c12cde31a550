"""AgentTuning on Ray: Ray Serve applications (model, EFT, environments, rollouts)."""
