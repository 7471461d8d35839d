"""Connected nodes: the link server (WebSocket) and the registry the router reads."""
