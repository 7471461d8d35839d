"""HTTP routers of the market: the buyer's OpenAI-compatible API and the admin API."""
