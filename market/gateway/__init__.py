"""The live request path: a buyer's request held, routed to a node, relayed back, charged.

* ``jobs`` — one job from hold to finalize (dispatch, failover, continuation);
* ``router`` — which connected node gets a job; ``registry`` — the nodes connected now;
* ``node_link`` — the WebSocket nodes dial (handshake, reader loop, heartbeats);
* ``funds`` — the hot-path balance cache; ``auth`` — API keys; ``ratelimit``;
* ``state`` — the process-wide objects the app's lifespan builds.

Money moves through ``market.money``; nothing here runs Celery or touches the chain.
"""
