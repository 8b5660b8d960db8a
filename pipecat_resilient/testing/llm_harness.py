"""Run an LLM service in a real Pipecat pipeline and record its replies (work in progress)."""
