"""The LLM side: OpenAI-compatible client, response cache, embedded offline model, prompts, annotation stages."""
