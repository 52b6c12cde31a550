"""The ground layer of AgentTuning on Ray: what jobs, Serve apps and environments all stand on.

Nothing here imports ``pipelines`` (the jobs) or ``serve`` (the Serve apps and environments).
"""
